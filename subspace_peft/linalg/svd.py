"""Truncated SVD for adapter initialisation: exact or seeded randomized, always computed in fp32.

Pure torch, no peft imports. Every function works on the weight's own device and returns fp32 factors
``(U, S, Vh)`` with ``U @ diag(S) @ Vh`` the best rank-``r`` approximation (exact) or a close one (randomized).
"""

from __future__ import annotations

import ctypes
from typing import Callable, Optional, Sequence

import torch

from .cache import weight_fingerprint
from .gram import gram_svd
from .settings import SVDComponents, SVDSettings

# Randomized SVDs of weights of one shape are stacked and run together while the stack stays under this many elements
# (fp32: 4 bytes each). Measured on CPU, stacking large weights is slower than a loop (LAPACK already
# uses every core), so only small matrices, where per-call overhead dominates, are batched.
DEFAULT_BATCH_ELEMENTS = 256 * 1024


def _orthonormal_basis(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced").Q


def _gaussian_test_matrix(n: int, k: int, seed: int, device: torch.device) -> torch.Tensor:
    # Drawn on the CPU so that the same seed gives the same matrix on every device.
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(n, k, generator=generator, dtype=torch.float32).to(device)


def _randomized(w: torch.Tensor, rank: int, settings: SVDSettings):
    """Batched randomized SVD of ``w`` with shape (..., m, n)."""
    m, n = w.shape[-2:]
    k = min(rank + settings.oversample, m, n)
    omega = _gaussian_test_matrix(n, k, settings.seed, w.device)
    q = _orthonormal_basis(w @ omega)
    wt = w.transpose(-2, -1)
    for _ in range(settings.niter):
        # Re-orthonormalise after each product so the small singular directions do not drown in round-off.
        q = _orthonormal_basis(wt @ q)
        q = _orthonormal_basis(w @ q)
    b = q.transpose(-2, -1) @ w  # (..., k, n)
    u_b, s, vh = torch.linalg.svd(b, full_matrices=False)
    u = q @ u_b
    return _leading(u, s, vh, rank)


def _exact_2d(weight: torch.Tensor, rank: int, components: SVDComponents = "principal"):
    """Exact triplets of one 2-D weight: through its float64 Gram matrix (``gram.py``) when that passes its accuracy
    checks, else LAPACK's full SVD in fp32."""
    triplet = gram_svd(weight, rank, components)
    if triplet is None:
        triplet = _full_svd(_as_fp32(weight), rank, components)
    _release_freed_memory()  # measured: without it, exact init peaked at 1.11-1.17x a LoRA init's RSS, with it 1.04x
    return triplet


def _full_svd(w: torch.Tensor, rank: int, components: SVDComponents = "principal"):
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    if components == "minor":
        return _kept(u, s, vh, slice(s.shape[-1] - rank, None))
    return _leading(u, s, vh, rank)


def _leading(u, s, vh, rank):
    return _kept(u, s, vh, slice(None, rank))


def _kept(u, s, vh, keep: slice):
    # Copies, not views: a view of some rows of Vh would keep the whole (k, n) factor alive. Measured on
    # SmolLM2-135M, views held ~500 MB of full factors until init finished.
    dense = torch.contiguous_format  # LAPACK returns column-major factors; hand out row-major copies
    return (
        u[..., keep].clone(memory_format=dense),
        s[..., keep].clone(memory_format=dense),
        vh[..., keep, :].clone(memory_format=dense),
    )


def _load_malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to release
        return None


_MALLOC_TRIM = _load_malloc_trim()


def _release_freed_memory() -> None:
    """Hand memory that LAPACK's freed full-size factors and workspaces left in glibc's heap back to the OS.

    Measured on SmolLM2-135M (210 exact SVDs): without this the process kept 100-450 MB of freed heap, varying
    from run to run, so init peaked at up to 1.45x the RSS of a plain LoRA init.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _as_fp32(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().to(torch.float32)


def truncated_svd(weight: torch.Tensor, rank: int, settings: SVDSettings = SVDSettings()):
    """Top-``rank`` (or with ``settings.components="minor"`` bottom-``rank``) singular triplets of a 2-D
    ``weight``, in fp32 on the weight's device.

    Returns ``(U, S, Vh)`` with shapes (m, rank), (rank,), (rank, n). The factors are fresh tensors (contiguous,
    not views into a larger decomposition), so holding them keeps no full-size temporary alive.
    """
    if weight.ndim != 2:
        raise ValueError(f"truncated_svd expects a 2-D weight, got shape {tuple(weight.shape)}")
    return truncated_svd_batched([weight], rank, settings)[0]


def truncated_svd_batched(
    weights: Sequence[torch.Tensor],
    rank: int,
    settings: SVDSettings = SVDSettings(),
    max_batch_elements: int = DEFAULT_BATCH_ELEMENTS,
):
    """Truncated SVD of several 2-D weights, one ``(U, S, Vh)`` per input weight, in input order.

    Exact: one weight at a time through its Gram matrix (see ``gram.py``; no stacking, so no second copy of the
    weights). Randomized: weights of equal shape and device are decomposed in one batched call; batching changes no
    result beyond round-off, as the test matrix depends on the seed and the shape only.
    """
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    for weight in weights:
        if weight.ndim != 2 or rank > min(weight.shape):
            raise ValueError(
                f"rank {rank} is larger than min(d_out, d_in) = {min(weight.shape)} of a weight of shape "
                f"{tuple(weight.shape)}; choose rank <= {min(weight.shape)}"
            )
    if settings.method == "exact":
        return [_exact_2d(weight, rank, settings.components) for weight in weights]
    results: list = [None] * len(weights)
    groups: dict[tuple, list[int]] = {}
    for index, weight in enumerate(weights):
        groups.setdefault((tuple(weight.shape), weight.device), []).append(index)
    for (shape, _device), indices in groups.items():
        per_batch = max(1, max_batch_elements // (shape[0] * shape[1]))
        for start in range(0, len(indices), per_batch):
            chunk = indices[start : start + per_batch]
            stacked = (
                torch.stack([_as_fp32(weights[i]) for i in chunk]) if len(chunk) > 1 else _as_fp32(weights[chunk[0]])
            )
            u, s, vh = _randomized(stacked, rank, settings)
            del stacked
            if len(chunk) == 1:
                results[chunk[0]] = (u, s, vh)
            else:
                for j, i in enumerate(chunk):
                    results[i] = (u[j].clone(), s[j].clone(), vh[j].clone())
    return results


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """All singular values of a 2-D ``weight``, descending, in fp32 on its device (no singular vectors)."""
    return torch.linalg.svdvals(_as_fp32(weight))


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r whose top-r singular values hold at least ``energy`` of sum(sigma^2) (the Frobenius energy)."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must lie in (0, 1], got {energy}")
    power = singular_values.double().pow(2)
    share = power.cumsum(0) / power.sum()
    return int(torch.searchsorted(share, torch.tensor(energy, dtype=share.dtype) - 1e-12).item()) + 1


def subspace_error(u_reference: torch.Tensor, u_estimate: torch.Tensor) -> float:
    """1 - ||U_ref^T U_est||_F^2 / r: zero when both span the same r-dimensional subspace, one when orthogonal."""
    r = u_reference.shape[-1]
    overlap = (u_reference.transpose(-2, -1).double() @ u_estimate.double()).pow(2).sum().item()
    return max(0.0, 1.0 - overlap / r)


def truncated_svds(
    named_weights: dict[str, torch.Tensor],
    ranks: dict[str, int],
    settings: SVDSettings = SVDSettings(),
    cache=None,
    desc: str = "SVD",
    before_compute: Optional[Callable[[str, torch.Tensor], None]] = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Truncated SVDs of many named 2-D weights: cached ones are read, the rest batched by (shape, rank).

    ``cache`` is an :class:`~subspace_peft.linalg.cache.SVDCache` or None: with several weights, the call's bundle
    (one file for all of them) is tried first, then each weight's entry. ``before_compute(name, weight)`` is called
    for every weight the cache did not answer, all before the first SVD (a check that raises stops the call before any
    work). A tqdm bar counts layers when there are more than a handful.
    """
    from tqdm.auto import tqdm

    requests = {}
    if cache is not None:
        requests = {
            name: (weight_fingerprint(weight), tuple(weight.shape), ranks[name])
            for name, weight in named_weights.items()
        }
        if len(requests) > 1:
            device = next(iter(named_weights.values())).device
            if all(weight.device == device for weight in named_weights.values()):
                bundle = cache.get_bundle(list(requests.values()), settings, device)
                if bundle is not None:
                    return {name: bundle[request] for name, request in requests.items()}
    results: dict[str, tuple] = {}
    todo: dict[tuple, list[str]] = {}
    with tqdm(total=len(named_weights), desc=desc, disable=len(named_weights) < 8, leave=False) as bar:
        for name, weight in named_weights.items():
            if cache is not None:
                fingerprint, shape, rank = requests[name]
                hit = cache.get(fingerprint, rank, settings, weight.device, shape=shape)
                if hit is not None:
                    results[name] = hit
                    bar.update(1)
                    continue
            todo.setdefault((tuple(weight.shape), ranks[name]), []).append(name)
        if before_compute is not None:
            for names in todo.values():
                for name in names:
                    before_compute(name, named_weights[name])
        for (_shape, rank), names in todo.items():
            factors = truncated_svd_batched([named_weights[n] for n in names], rank, settings)
            for name, triplet in zip(names, factors):
                results[name] = triplet
                if cache is not None:
                    fingerprint, shape, _ = requests[name]
                    cache.put(fingerprint, rank, settings, triplet, shape=shape)
            bar.update(len(names))
    if len(requests) > 1:
        cache.put_bundle({requests[name]: triplet for name, triplet in results.items()}, settings)
    return results
