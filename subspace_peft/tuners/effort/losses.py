"""Effort's two regularisers on one layer, written with r x r Gram matrices: no d_out x d_in matrix is formed and no
frozen copy of the principal factors is kept.

Notation: ``W`` (d_out, d_in) is the frozen base weight, ``n = min(d_out, d_in)``, ``k = n - r``. Effort trains
``U`` (d_out, r), ``s`` (r,) and ``Vh`` (r, d_in), initialised to the r minor singular triplets ``U_0, s_0, Vh_0``;
``U_k, S_k, V_k`` are the frozen principal triplets. ``V = Vh^T``.
"""

from __future__ import annotations

import torch

Triplet = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (U, s, Vh)

# A principal singular value below this share of the largest is treated as this share when dividing by it: it only
# occurs in numerically rank-deficient weights, whose principal directions there are round-off anyway.
MIN_RELATIVE_SINGULAR_VALUE = 1e-6


def frobenius_inner(first: Triplet, second: Triplet) -> torch.Tensor:
    """``<U_1 diag(s_1) Vh_1, U_2 diag(s_2) Vh_2>_F`` from the (r_1, r_2) Gram matrices of the factors."""
    u1, s1, vh1 = first
    u2, s2, vh2 = second
    return ((s1[:, None] * (u1.T @ u2) * s2[None, :]) * (vh1 @ vh2.T)).sum()


def weight_inner(weight: torch.Tensor, triplet: Triplet) -> torch.Tensor:
    """``<W, U diag(s) Vh>_F = sum_i s_i u_i^T W v_i``; the product with W runs in W's dtype."""
    u, s, vh = triplet
    w_v = (weight @ vh.T.to(weight.dtype)).float()  # (d_out, r)
    return (s * (u * w_v).sum(0)).sum()


def norm_preservation_loss(weight: torch.Tensor, current: Triplet, initial: Triplet) -> torch.Tensor:
    """``| ||W + D||_F^2 - ||W||_F^2 |`` with ``D = U diag(s) Vh - U_0 diag(s_0) Vh_0``, as ``|2<W, D> + ||D||^2|``.

    Exactly zero when the factors equal their initial values (each term is computed the same way for both).
    """
    cross = 2 * (weight_inner(weight, current) - weight_inner(weight, initial))
    change = frobenius_inner(current, current) - 2 * frobenius_inner(current, initial) + frobenius_inner(initial, initial)
    return (cross + change).abs()


def _gram_deviation(x: torch.Tensor) -> torch.Tensor:
    """``||X^T X - I||_F^2``."""
    gram = x.T @ x
    return (gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)).pow(2).sum()


def _principal_overlap_complete(x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """``||X_k^T X||_F^2`` on a complete side (``[X_k X_0]`` square orthogonal, so ``X_k X_k^T = I - X_0 X_0^T``)."""
    return (x - x0 @ (x0.T @ x)).pow(2).sum()


def _principal_overlap_incomplete(mapped: torch.Tensor, principal: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``||X_k^T X||_F^2`` on the longer side of a non-square W, from the shorter side's principal vectors ``Q_k``:
    ``V_k^T V = S_k^{-1} U_k^T (W V)`` and ``U_k^T U = S_k^{-1} V_k^T (W^T U)``; ``mapped`` is ``W V`` or ``W^T U``."""
    basis, singular_values = principal
    return ((basis.T @ mapped) / singular_values[:, None]).pow(2).sum()


def orthogonality_loss(
    weight: torch.Tensor, current: Triplet, initial: Triplet, principal: tuple[torch.Tensor, torch.Tensor] | None
) -> torch.Tensor:
    """``||[U_k U]^T [U_k U] - I||_F^2 + ||[V_k V]^T [V_k V] - I||_F^2``.

    With ``U_k^T U_k = I`` each term is ``2 ||U_k^T U||_F^2 + ||U^T U - I||_F^2``. ``principal`` is
    :func:`shorter_side_principal` of W, needed for non-square W only.
    """
    u, _, vh = current
    u0, _, vh0 = initial
    v, v0 = vh.T, vh0.T
    d_out, d_in = weight.shape
    if d_out <= d_in:
        overlap_u = _principal_overlap_complete(u, u0)
    else:
        overlap_u = _principal_overlap_incomplete((weight.T @ u.to(weight.dtype)).float(), principal)
    if d_in <= d_out:
        overlap_v = _principal_overlap_complete(v, v0)
    else:
        overlap_v = _principal_overlap_incomplete((weight @ v.to(weight.dtype)).float(), principal)
    return 2 * (overlap_u + overlap_v) + _gram_deviation(u) + _gram_deviation(v)


@torch.no_grad()
def shorter_side_principal(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(``Q_k``, ``S_k``): the top ``k = n - r`` singular vectors of W's shorter side (U_k if d_out < d_in, else
    V_k) and singular values, in fp32. A min(d_out, d_in)^2 tensor, never the size of W itself."""
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    k = s.shape[0] - r
    basis = u[:, :k] if weight.shape[0] < weight.shape[1] else vh[:k].T
    return basis.contiguous(), s[:k].clamp_min(s[0] * MIN_RELATIVE_SINGULAR_VALUE)
