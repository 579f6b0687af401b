"""QPiSSA with alternating iterations (``PiSSAConfig(residual_quant_iters=k)``).

LoftQ (Li et al., 2023, arXiv:2310.08659, Algorithm 1) and the PiSSA authors' QPiSSA (Meng et al., section 4.3)
choose the low-rank factors so that quantised residual plus adapter is close to ``W``: minimise
``||W - (Q + s B A)||_F`` over ``Q`` in the quantiser's grid and rank-r ``s B A`` by alternating

    A_1, B_1 = PiSSA factors of SVD_r(W)                 (Q_0 = 0: iteration 1 is plain QPiSSA)
    Q_j     = dequant(quant(W - s B_j A_j))              (the layer's own bitsandbytes quantiser)
    A_{j+1}, B_{j+1} = PiSSA factors of SVD_r(W - Q_j)   (the best rank-r fit of what Q_j missed)

Only the factors come out of here: the layer then quantises ``W - s B_k A_k`` once more from the factors it holds
(``PiSSALayer.quantize_residual_into_base``), exactly as it does when a saved adapter is loaded, so reload never
iterates. Quantisation is not a projection onto a convex set, so the error need not fall at every step: the iterate
with the lowest Frobenius error is kept (iteration 1 included), so k > 1 is never worse than k = 1 on a layer.
"""

from __future__ import annotations

import torch
from torch import nn

from ...linalg.settings import SVDSettings
from ...linalg.svd import truncated_svd
from .bnb import dequantized_weight, quantize_residual
from .factors import pissa_factors


def quant_dequant(linear: nn.Linear, residual: torch.Tensor, kind: str, storage: str | None = None) -> torch.Tensor:
    """``residual`` through the bitsandbytes quantiser the QPiSSA layer uses (in ``linear``'s dtype), back in fp32."""
    return dequantized_weight(quantize_residual(linear, residual, kind, storage))


def alternating_factors(
    linear: nn.Linear,
    factors: tuple[torch.Tensor, torch.Tensor],
    scale: float,
    kind: str,
    iters: int,
    settings: SVDSettings,
    storage: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's initial ``(A, B)`` of ``linear`` refined by ``iters - 1`` more SVD/quantisation alternations (see the
    module docstring); ``factors`` are iteration 1's (plain PiSSA) factors, ``settings`` the layer's SVD settings.
    Returns the factors of the iterate with the lowest ``||W - (Q + s B A)||_F``; ``linear`` is left untouched."""

    a, b = factors
    if iters <= 1:
        return a, b
    weight = linear.weight.detach().float()
    rank = a.shape[0]
    best, best_error = (a, b), None
    for step in range(iters):
        principal = scale * (b.float() @ a.float())
        quantised = quant_dequant(linear, weight - principal, kind, storage)
        error = torch.linalg.matrix_norm(weight - quantised - principal).item()
        if best_error is None or error < best_error:
            best, best_error = (a, b), error
        if step == iters - 1:
            break
        u, s, vh = truncated_svd(weight - quantised, rank, settings)
        a, b = pissa_factors(u, s, vh, scaling=scale)
        del u, s, vh, quantised, principal
    return best
