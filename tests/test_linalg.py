"""The shared SVD engine: exact, seeded randomized, batched, cached."""

from __future__ import annotations

import pytest
import torch

from subspace_peft.linalg import (
    SVDCache,
    SVDSettings,
    energy_rank,
    subspace_error,
    truncated_svd,
    truncated_svd_batched,
    truncated_svds,
    weight_fingerprint,
)

from parity import rel_err


def low_rank_plus_noise(m, n, rank, seed=0, noise=1e-3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) + noise * torch.randn(
        m, n, generator=g
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_exact_matches_lapack_and_returns_fp32(dtype):
    w = low_rank_plus_noise(40, 30, 8).to(dtype)
    u, s, vh = truncated_svd(w, 5)
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    assert (u.shape, s.shape, vh.shape) == ((40, 5), (5,), (5, 30))
    ref = torch.linalg.svd(w.float(), full_matrices=False)
    assert rel_err(s, ref.S[:5]) <= 1e-5
    assert subspace_error(ref.U[:, :5], u) <= 1e-6


def test_randomized_recovers_a_low_rank_subspace_and_is_seeded():
    w = low_rank_plus_noise(120, 80, 6)
    settings = SVDSettings("randomized", niter=2, oversample=8, seed=3)
    u, s, _ = truncated_svd(w, 6, settings)
    ref = torch.linalg.svd(w, full_matrices=False)
    assert subspace_error(ref.U[:, :6], u) <= 1e-6
    assert rel_err(s, ref.S[:6]) <= 1e-5
    torch.manual_seed(123)
    again = truncated_svd(w, 6, settings)[0]
    assert torch.equal(u, again)
    other_seed = truncated_svd(w, 6, SVDSettings("randomized", seed=4))[0]
    assert not torch.equal(u, other_seed)


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_batched_equals_one_by_one(method):
    weights = [low_rank_plus_noise(30, 20, 5, seed=i) for i in range(5)] + [low_rank_plus_noise(16, 24, 4, seed=9)]
    settings = SVDSettings(method)
    batched = truncated_svd_batched(weights, 3, settings, max_batch_elements=10**9)
    for weight, (u, s, vh) in zip(weights, batched):
        u1, s1, vh1 = truncated_svd(weight, 3, settings)
        assert rel_err(s, s1) <= 1e-5
        assert rel_err(u @ torch.diag(s) @ vh, u1 @ torch.diag(s1) @ vh1) <= 1e-4


def test_rank_checks_name_the_fix():
    with pytest.raises(ValueError, match="rank 9 is larger than min"):
        truncated_svd(torch.randn(8, 10), 9)
    with pytest.raises(ValueError, match="positive"):
        truncated_svd(torch.randn(8, 10), 0)
    with pytest.raises(ValueError, match="'exact' or 'randomized'"):
        SVDSettings("lanczos")


def test_energy_rank_counts_squared_singular_values():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert energy_rank(s, 9 / 14) == 1
    assert energy_rank(s, 0.9) == 2
    assert energy_rank(s, 1.0) == 3
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            energy_rank(s, bad)


def test_cache_round_trip_and_key(tmp_path):
    w = low_rank_plus_noise(20, 12, 4)
    cache = SVDCache(tmp_path)
    settings = SVDSettings("randomized", seed=1)
    first = truncated_svds({"w": w}, {"w": 3}, settings, cache)["w"]
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    hit = cache.get(weight_fingerprint(w), 3, settings, torch.device("cpu"))
    for a, b in zip(first, hit):
        assert torch.equal(a, b)
    assert cache.get(weight_fingerprint(w), 3, SVDSettings("randomized", seed=2), torch.device("cpu")) is None
    assert weight_fingerprint(w) != weight_fingerprint(w + 1e-7)
    assert weight_fingerprint(w) != weight_fingerprint(w.reshape(12, 20))
    files[0].write_bytes(b"not safetensors")  # a corrupt entry is a miss, not an error
    assert cache.get(weight_fingerprint(w), 3, settings, torch.device("cpu")) is None
