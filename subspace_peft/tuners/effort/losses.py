"""Effort's two regularisers, for a group of layers of one weight shape at once: r x r Gram matrices batched over the
group and one thin product with each frozen weight. No d_out x d_in matrix is formed, no frozen copy of the
principal factors is kept.

Notation: ``W`` (d_out, d_in) is a frozen base weight, ``n = min(d_out, d_in)``, ``k = n - r``. Effort trains
``U`` (d_out, r), ``s`` (r,) and ``Vh`` (r, d_in), initialised to the r minor singular triplets ``U_0, s_0, Vh_0``;
``U_k, S_k, V_k`` are the frozen principal triplets; ``V = Vh^T``.

Norm loss: ``||W + D||^2 - ||W||^2 = 2 <W, D> + ||D||^2`` with ``D = U diag(s) Vh - U_0 diag(s_0) Vh_0``,
``<W, U diag(s) Vh> = sum_i s_i u_i^T W v_i``, and inner products of two such products from their Gram matrices.
Orthogonality loss: ``||[U_k U]^T [U_k U] - I||^2 = 2 ||U_k^T U||^2 + ||U^T U - I||^2`` (``U_k^T U_k = I``), and
the same for V. On a complete side (``[U_k U_0]`` square orthogonal) ``||U_k^T U||^2 = ||U - U_0 U_0^T U||^2``; on
the longer side of a non-square W, ``V_k^T V = S_k^{-1} U_k^T (W V)`` (or ``U_k^T U = S_k^{-1} V_k^T (W^T U)``),
from the shorter side's principal vectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...linalg.svd import truncated_svd

# A principal singular value below this share of the largest is treated as this share when dividing by it: it only
# occurs in numerically rank-deficient weights, whose principal directions there are round-off anyway.
MIN_RELATIVE_SINGULAR_VALUE = 1e-6


@dataclass
class LossInputs:
    """One layer's share of the losses: its weight matrix and (U, s, Vh) now and at init, all fp32 but W."""

    weight: torch.Tensor
    current: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    initial: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    principal: Optional[tuple[torch.Tensor, torch.Tensor]]  # (Q_k, S_k) of the shorter side; None for square W
    initial_thin: torch.Tensor  # thin_product(W, U_0, Vh_0), a constant the layer keeps (see thin_product)
    square_norm: torch.Tensor  # ||W||_F^2 in fp32 (1 for an all-zero W), a constant the layer keeps


@torch.no_grad()
def weight_square_norm(weight: torch.Tensor) -> torch.Tensor:
    """``||W||_F^2`` accumulated in fp32 without an fp32 copy of W; 1 for an all-zero W, so that dividing by it
    leaves the norm loss absolute there instead of infinite."""
    square = torch.linalg.vector_norm(weight, dtype=torch.float32).square()
    return torch.where(square > 0, square, torch.ones_like(square))


@torch.no_grad()
def shorter_side_principal(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(``Q_k``, ``S_k``): the top ``k = n - r`` singular vectors of W's shorter side (U_k if d_out < d_in, else
    V_k) and singular values, in fp32. A min(d_out, d_in)^2 tensor, never the size of W itself."""
    u, s, vh = truncated_svd(weight, min(weight.shape) - r)
    basis = u if weight.shape[0] < weight.shape[1] else vh.T
    return basis.contiguous(), s.clamp_min(s[0] * MIN_RELATIVE_SINGULAR_VALUE)


def thin_product(weight: torch.Tensor, u: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """``W V`` (d_out, r) when d_in >= d_out, else ``W^T U`` (d_in, r), in W's dtype: the one product with W a layer
    needs, on the side that is incomplete for a wide or tall weight."""
    if weight.shape[1] >= weight.shape[0]:
        return (weight @ vh.T.to(weight.dtype)).float()
    return (weight.T @ u.to(weight.dtype)).float()


def _principal_overlap(principal, thin: torch.Tensor) -> torch.Tensor:
    """``S_k^{-1} Q_k^T thin``: ``V_k^T V`` or ``U_k^T U`` on the longer side of a non-square W."""
    basis, values = principal
    return (basis.T @ thin) / values[:, None]


def _pair_inner(s_a, s_b, gram_u, gram_v) -> torch.Tensor:
    """``<U_a diag(s_a) Vh_a, U_b diag(s_b) Vh_b>`` per layer, from ``gram_u = U_b^T U_a``, ``gram_v = Vh_b Vh_a^T``."""
    return (s_a[..., :, None] * s_b[..., None, :] * gram_u.mT * gram_v.mT).sum((-2, -1))


def _squared_deviation_from_identity(gram: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return (gram - eye).pow(2).sum((-2, -1))


def _stacked(layers: list[LossInputs], which: str):
    return tuple(torch.stack(parts) for parts in zip(*(getattr(layer, which) for layer in layers)))


def _weight_inners(layers: list[LossInputs], which: str, tall: bool):
    """Per layer ``<W, U diag(s) Vh>`` for the ``which`` ("current" or "initial") factors, the thin products it
    used, and the stacked factors. Each thin product reads all of W, so the initial ones are kept by the layers
    (computed by the same function, hence bitwise what the current factors give at init)."""
    if which == "initial":
        thin = torch.stack([layer.initial_thin for layer in layers])
    else:
        thin = torch.stack([thin_product(layer.weight, layer.current[0], layer.current[2]) for layer in layers])
    u, s, vh = _stacked(layers, which)
    other = vh.mT if tall else u
    return (s * (other * thin).sum(-2)).sum(-1), thin, (u, s, vh)


def group_losses(layers: list[LossInputs]) -> dict[str, torch.Tensor]:
    """``{"orth": sum of (||[U_k U]^T[U_k U] - I||^2 + ||[V_k V]^T[V_k V] - I||^2) / (2 r), "norm": sum of
    | ||W + D||^2 - ||W||^2 | / ||W||^2}`` over ``layers``, which share one weight shape and rank.

    Each layer's terms are normalised so that layers of any size and rank weigh alike: the orthogonality loss per
    trained direction and side (a direction turned by a small angle t into the principal subspace adds about
    ``t^2``), the norm loss as the relative change of the weight's energy. The norm loss is exactly zero while the
    factors equal their initial values: the initial terms are computed by the same operations as the current ones.
    """
    d_out, d_in = layers[0].weight.shape
    tall = d_out > d_in
    inner, thin, (u, s, vh) = _weight_inners(layers, "current", tall)
    with torch.no_grad():
        initial_inner, _, (u0, s0, vh0) = _weight_inners(layers, "initial", tall)
        initial_square_norm = _pair_inner(s0, s0, u0.mT @ u0, vh0 @ vh0.mT)
    gram_u, gram_v = u.mT @ u, vh @ vh.mT
    cross_u, cross_v = u0.mT @ u, vh0 @ vh.mT
    if d_out != d_in:
        overlap = torch.stack([_principal_overlap(layer.principal, t) for layer, t in zip(layers, thin)])
        overlap = overlap.pow(2).sum((-2, -1))
    if d_out <= d_in:
        overlap_u = (u - u0 @ cross_u).pow(2).sum((-2, -1))
    else:
        overlap_u = overlap
    if d_in <= d_out:
        overlap_v = (vh - cross_v.mT @ vh0).pow(2).sum((-2, -1))
    else:
        overlap_v = overlap
    orth = (
        2 * (overlap_u + overlap_v)
        + _squared_deviation_from_identity(gram_u)
        + _squared_deviation_from_identity(gram_v)
    )
    change = _pair_inner(s, s, gram_u, gram_v) - 2 * _pair_inner(s, s0, cross_u, cross_v) + initial_square_norm
    norm = (2 * (inner - initial_inner) + change).abs()
    square_norm = torch.stack([layer.square_norm for layer in layers])
    return {"orth": (orth / (2 * u.shape[-1])).sum(), "norm": (norm / square_norm).sum()}
