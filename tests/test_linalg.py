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


def decaying_spectrum(m, n, seed=0, decay=0.7):
    """A float64 weight with singular values decay**i (i = 0..min(m, n)-1) and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    s = decay ** torch.arange(k, dtype=torch.float64)
    return u @ torch.diag(s) @ v.T, u, s, v


def sin_angle(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    """Sine of the largest principal angle between the column spaces (float64, the estimate re-orthonormalised so
    that fp32 rounding of its norms does not count)."""
    basis = torch.linalg.qr(estimate.double()).Q
    return float(torch.linalg.matrix_norm(basis - reference @ (reference.T @ basis), ord=2))


@pytest.mark.parametrize("shape", [(90, 70), (70, 90)])  # tall and wide: the Gram matrix of the shorter side
@pytest.mark.parametrize("components", ["principal", "minor"])
def test_exact_route_is_at_least_as_accurate_as_an_fp32_lapack_svd(shape, components):
    from subspace_peft.linalg.gram import gram_svd

    w = decaying_spectrum(*shape, decay=0.93)[0].float()
    rank = 6
    keep = slice(0, rank) if components == "principal" else slice(min(shape) - rank, None)
    triplet = gram_svd(w, rank, components)
    assert triplet is not None, "a well-conditioned weight takes the Gram route"
    u, s, vh = truncated_svd(w, rank, SVDSettings(components=components))
    assert torch.equal(u, triplet[0]) and torch.equal(s, triplet[1])
    lapack = torch.linalg.svd(w, full_matrices=False)
    # against the float64 truth of the rounded fp32 weight: ours is no worse than LAPACK's fp32 answer
    exact = torch.linalg.svd(w.double(), full_matrices=False)
    truth_s, truth_u = exact.S[keep], exact.U[:, keep]
    ours_s = float((s.double() - truth_s).abs().max() / truth_s.max())
    lapack_s = float((lapack.S[keep].double() - truth_s).abs().max() / truth_s.max())
    assert ours_s <= max(lapack_s, 1e-7)
    assert sin_angle(truth_u, u) <= max(sin_angle(truth_u, lapack.U[:, keep]), 1e-6)
    assert float((u.double().T @ u.double() - torch.eye(rank, dtype=torch.float64)).abs().max()) <= 2**-24
    assert bool((s[1:] <= s[:-1]).all()), "descending, as LAPACK returns them"
    truth = exact.U[:, keep] @ torch.diag(exact.S[keep]) @ exact.Vh[keep]
    assert rel_err((u.double() * s.double()) @ vh.double(), truth) <= 1e-6


def test_exact_route_falls_back_to_lapack_on_a_rank_deficient_weight():
    from subspace_peft.linalg.gram import gram_svd

    w = low_rank_plus_noise(80, 64, 3, noise=0.0)  # rank 3: the 4th singular vector is 0/0 through the Gram matrix
    assert gram_svd(w, 5, "principal") is None
    u, s, vh = truncated_svd(w, 5)
    ref = torch.linalg.svd(w, full_matrices=False)
    assert torch.equal(s, ref.S[:5].contiguous())  # LAPACK's own answer
    assert rel_err(u @ torch.diag(s) @ vh, w) <= 1e-5


def test_exact_route_uses_a_partial_eigensolver_on_large_grams(monkeypatch):
    import scipy.linalg

    from subspace_peft.linalg import gram

    calls = []
    real = scipy.linalg.eigh

    def spy(a, *args, **kwargs):
        calls.append(kwargs.get("subset_by_index"))
        return real(a, *args, **kwargs)

    monkeypatch.setattr(scipy.linalg, "eigh", spy)
    w = decaying_spectrum(200, 96, decay=0.97)[0].float()
    gram.gram_svd(w, 4, "principal")
    gram.gram_svd(w, 4, "minor")
    assert calls == [[92, 95], [0, 3]]  # only the wanted eigenpairs of the 96 x 96 Gram matrix
