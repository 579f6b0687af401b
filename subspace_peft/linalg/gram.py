"""Exact truncated SVD through the float64 Gram matrix of a weight's shorter side.

For a weight ``W`` (m, n) let ``A`` be ``W`` or ``W^T``, whichever is tall (p, k) with ``k = min(m, n)``. The Gram
matrix ``G = A^T A`` (k, k) has eigenvalues ``sigma_i^2`` and eigenvectors ``v_i``, the singular vectors of ``A``'s
short side; the other side is ``A v_i / sigma_i``. Only the ``rank`` wanted eigenpairs are computed (LAPACK
``dsyevr``: tridiagonal reduction, then MRRR for the chosen indices), which skips the
bidiagonalisation of the tall side and the vectors nobody keeps: 2-4x faster than ``torch.linalg.svd`` on
SmolLM2's projections (benchmarks/bench_init.py).

Accuracy. Squaring doubles the condition number, and float64 pays for it: a perturbation ``E`` of ``G`` moves an
eigenvector by about ``||E|| / (sigma_i^2 - sigma_j^2)`` (Davis-Kahan), so with ``||E|| ~ eps64 sigma_1^2`` the
singular vectors come out with error ``eps64 sigma_1^2 / ((sigma_i - sigma_j)(sigma_i + sigma_j))``, against
``eps32 sigma_1 / (sigma_i - sigma_j)`` for a float32 SVD of ``W``: no worse unless ``sigma_i < 1e-9 sigma_1``.
Each result is checked before it is returned: the recovered side must be orthonormal and every triplet must
satisfy ``||W^T u - sigma v|| <= 2^-24 ||W||`` (a float32-exact singular triplet); anything else (a rank-deficient
weight, where ``A v / sigma`` is 0/0) returns None and the caller runs LAPACK's SVD instead.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from .settings import SVDComponents

# A returned triplet is an exact singular triplet of W + E with ||E|| at most this times ||W||_2 (float32's unit
# round-off), and the returned singular vectors are orthonormal to within the same.
FP32_TOLERANCE = 2.0**-24
# Below this many columns in the Gram matrix, the full eigendecomposition costs about as much as a partial one.
_PARTIAL_FROM = 64


def _tall(weight: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(A, transposed)``: the weight in float64, transposed if it is wide, so that ``A`` is (p, k) with p >= k."""
    a = weight.detach().to(torch.float64)
    if a.shape[0] < a.shape[1]:
        return a.T, True
    return a, False


def _eigenpairs(gram: torch.Tensor, rank: int, components: SVDComponents) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``rank`` largest (principal) or smallest (minor) eigenpairs of a symmetric ``gram``, ascending."""
    k = gram.shape[0]
    wanted = [k - rank, k - 1] if components == "principal" else [0, rank - 1]
    if gram.device.type != "cpu" or k < _PARTIAL_FROM:
        values, vectors = torch.linalg.eigh(gram)
        return values[wanted[0] : wanted[1] + 1], vectors[:, wanted[0] : wanted[1] + 1]
    import scipy.linalg

    with _scipy_blas().limit(limits=1):
        values, vectors = scipy.linalg.eigh(gram.numpy(), subset_by_index=wanted, driver="evr", check_finite=False)
    return torch.from_numpy(values), torch.from_numpy(vectors)


@functools.lru_cache(maxsize=1)
def _scipy_blas():
    """The BLAS libraries scipy's LAPACK runs on, to hold at one thread for the eigensolver: with more, their threads
    keep spinning after each call and starve the torch threads of the next Gram product (measured on SmolLM2's 210
    weights, 2 cores: 7.6 s with 2 threads, 3.8 s with 1; the tridiagonal reduction gains little from a second)."""
    import scipy.linalg  # noqa: F401 - loads scipy's BLAS, so the controller sees it
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


def gram_svd(weight: torch.Tensor, rank: int, components: SVDComponents = "principal") -> Optional[tuple]:
    """``(U, S, Vh)`` of the ``rank`` principal or minor singular triplets of a 2-D ``weight``, fp32, singular values
    descending, on the weight's device; None when the result fails its accuracy checks (use a full SVD then)."""
    a, transposed = _tall(weight)
    gram = a.T @ a
    squared, short_side = _eigenpairs(gram, rank, components)
    squared, short_side = squared.flip(0), short_side.flip(1)  # descending, as LAPACK's SVD returns them
    if not bool((squared > 0).all()):
        return None
    sigma = squared.sqrt()
    long_side = (a @ short_side) / sigma
    # ||W||_2 >= sigma_1 >= ||W||_F / sqrt(k): the residual bound uses the smaller, so the check is never looser
    norm = max(float(sigma[0]), float(torch.linalg.matrix_norm(a)) / a.shape[1] ** 0.5)
    residual = (gram @ short_side / sigma - short_side * sigma).norm(dim=0).max()
    gram_of_long = long_side.T @ long_side
    drift = (gram_of_long - torch.eye(rank, dtype=gram_of_long.dtype, device=gram_of_long.device)).abs().max()
    if not (float(residual) <= FP32_TOLERANCE * norm and float(drift) <= FP32_TOLERANCE):
        return None
    u, vh = (short_side, long_side.T) if transposed else (long_side, short_side.T)
    return u.float().contiguous(), sigma.float(), vh.float().contiguous()
