"""The on-disk SVD cache can skip work but never change a result: every bad entry or unusable folder is a miss or a
skipped write with one warning per cache object and kind of problem, never an exception."""

from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import subspace_peft.linalg.cache as cache_module
from subspace_peft.linalg.cache import (
    FORMAT,
    SVDCache,
    SVDCacheWarning,
    entry_checksum,
    entry_record,
    weight_fingerprint,
)
from subspace_peft.linalg.svd import SVDSettings, truncated_svd, truncated_svds

M, N, RANK = 40, 30, 4
EXACT = SVDSettings()
CPU = torch.device("cpu")


def weight(seed: int = 0, m: int = M, n: int = N) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed))


def fresh(w: torch.Tensor, rank: int = RANK, settings: SVDSettings = EXACT):
    return truncated_svd(w, rank, settings)


def assert_same(factors, expected):
    for got, want in zip(factors, expected):
        assert got.shape == want.shape and got.dtype == torch.float32
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)


def through_cache(cache: SVDCache, w: torch.Tensor, rank: int = RANK, settings: SVDSettings = EXACT):
    """``truncated_svds`` of one weight through ``cache``; returns the factors and the cache warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        factors = truncated_svds({"w": w}, {"w": rank}, settings, cache)["w"]
    return factors, [c for c in caught if issubclass(c.category, SVDCacheWarning)]


def entry_path(cache: SVDCache, w: torch.Tensor, rank: int = RANK, settings: SVDSettings = EXACT) -> Path:
    return cache._path(weight_fingerprint(w), rank, settings)


def read_entry(path: Path):
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata())


def write_entry(path: Path, tensors: dict, record: dict, checksum: str | None = None):
    """A hand-made entry; by default with a checksum that matches its (possibly bad) tensors and record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = dict(record, checksum=checksum if checksum is not None else entry_checksum(tensors, record))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def good_tensors(w: torch.Tensor, rank: int = RANK, settings: SVDSettings = EXACT) -> dict:
    u, s, vh = fresh(w, rank, settings)
    return {"U": u, "S": s, "Vh": vh}


def no_temporary_files(folder: Path) -> bool:
    return not folder.exists() or all(not p.name.endswith(".tmp") for p in folder.iterdir())


def assert_poisoned_entry_is_a_miss(tmp_path, w, tamper_reason, settings=EXACT, rank=RANK):
    """Read the (already poisoned) entry through a fresh cache twice: recomputed, one warning, no exception."""
    cache = SVDCache(tmp_path)
    factors, caught = through_cache(cache, w, rank, settings)
    assert_same(factors, fresh(w, rank, settings))
    assert len(caught) == 1, [str(c.message) for c in caught]
    assert tamper_reason in str(caught[0].message)
    return cache, factors


# -- good entries ----------------------------------------------------------------------------------------------
def test_round_trip_records_provenance_and_hits_without_an_svd(tmp_path, monkeypatch):
    w = weight()
    cache = SVDCache(tmp_path)
    first, caught = through_cache(cache, w)
    assert not caught
    assert_same(first, fresh(w))
    tensors, metadata = read_entry(entry_path(cache, w))
    assert metadata["format"] == FORMAT
    assert metadata["fingerprint"] == weight_fingerprint(w)
    assert metadata["weight_shape"] == f"{M}x{N}"
    assert metadata["rank"] == str(RANK)
    assert metadata["settings"] == EXACT.key()
    assert metadata["checksum"] == entry_checksum(tensors, metadata)

    def no_svd(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr("subspace_peft.linalg.svd.truncated_svd_batched", no_svd)
    second, caught = through_cache(SVDCache(tmp_path), w)
    assert not caught
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "settings", [SVDSettings(components="minor"), SVDSettings("randomized", seed=3)], ids=["minor", "randomized"]
)
def test_minor_and_randomized_entries_are_hits(tmp_path, settings):
    w = weight(1)
    first, caught = through_cache(SVDCache(tmp_path), w, settings=settings)
    assert not caught
    s = first[1]
    # minor components are the trailing ``rank`` of LAPACK's descending values: still descending
    assert bool((s[1:] <= s[:-1]).all())
    if settings.components == "minor":
        assert torch.allclose(s, torch.linalg.svdvals(w)[-RANK:])
    cache = SVDCache(tmp_path)
    hit = cache.get(weight_fingerprint(w), RANK, settings, CPU, shape=(M, N))
    assert hit is not None
    for a, b in zip(first, hit):
        assert torch.equal(a, b)


def test_get_without_shape_still_checks_the_factors(tmp_path):
    w = weight()
    cache = SVDCache(tmp_path)
    through_cache(cache, w)
    assert cache.get(weight_fingerprint(w), RANK, EXACT, CPU) is not None
    # asked for another shape than recorded: a miss
    with pytest.warns(SVDCacheWarning, match="another weight"):
        assert cache.get(weight_fingerprint(w), RANK, EXACT, CPU, shape=(N, M)) is None


# -- unusable folders ------------------------------------------------------------------------------------------
def test_cache_path_that_is_a_file(tmp_path):
    target = tmp_path / "not_a_folder"
    target.write_bytes(b"user data")
    cache = SVDCache(target)
    w = weight()
    for seed in (0, 1):  # two weights, two misses and two skipped writes: one warning in all
        w = weight(seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            factors = truncated_svds({"w": w}, {"w": RANK}, EXACT, cache)["w"]
        assert_same(factors, fresh(w))
        warned = [c for c in caught if issubclass(c.category, SVDCacheWarning)]
        assert len(warned) == (1 if seed == 0 else 0)
        if warned:
            assert "is a file, not a folder" in str(warned[0].message)
    assert target.read_bytes() == b"user data"
    assert list(tmp_path.iterdir()) == [target]


def test_folder_that_cannot_be_created(tmp_path, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    folder = tmp_path / "cache" / "svd"
    cache = SVDCache(folder)
    factors, caught = through_cache(cache, weight())
    assert_same(factors, fresh(weight()))
    assert len(caught) == 1 and "could not be created" in str(caught[0].message)
    _, caught = through_cache(cache, weight(1))
    assert not caught
    assert not folder.exists()


def test_folder_under_a_file_cannot_be_created(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    cache = SVDCache(tmp_path / "file" / "svd")
    factors, caught = through_cache(cache, weight())
    assert_same(factors, fresh(weight()))
    assert len(caught) == 1 and "could not be created" in str(caught[0].message)
    assert (tmp_path / "file").read_bytes() == b"x"


def recomputes_and_warns_once(cache, message: str) -> None:
    """Two weights through a cache that cannot be written: both give fresh factors, one warning in all."""
    for seed in (0, 1):
        factors, caught = through_cache(cache, weight(seed))
        assert_same(factors, fresh(weight(seed)))
        assert len(caught) == (1 if seed == 0 else 0)
        if caught:
            assert message in str(caught[0].message)


def test_read_only_folder(tmp_path, monkeypatch):
    # root writes through chmod, so a read-only folder is simulated: the rename into place is refused
    def refuse(src, dst, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(dst))

    monkeypatch.setattr(cache_module.os, "replace", refuse)
    recomputes_and_warns_once(SVDCache(tmp_path), "not writable")
    assert list(tmp_path.iterdir()) == []  # the temporary files were removed


def test_read_only_folder_refusing_the_write(tmp_path, monkeypatch):
    def refuse(tensors, filename, metadata=None):
        raise PermissionError(errno.EROFS, "Read-only file system", filename)

    monkeypatch.setattr(cache_module, "save_file", refuse)
    factors, caught = through_cache(SVDCache(tmp_path), weight())
    assert_same(factors, fresh(weight()))
    assert len(caught) == 1 and "not writable" in str(caught[0].message)
    assert list(tmp_path.iterdir()) == []


def test_full_disk(tmp_path, monkeypatch):
    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # what a write cut short by ENOSPC leaves
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(cache_module, "save_file", half_written)
    cache = SVDCache(tmp_path)
    recomputes_and_warns_once(cache, "no space left")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    _, caught = through_cache(SVDCache(tmp_path), weight())  # space again: written, then a hit
    assert not caught and entry_path(cache, weight()).is_file()


def test_entry_name_taken_by_a_folder(tmp_path):
    w = weight()
    cache = SVDCache(tmp_path)
    entry_path(cache, w).mkdir()
    factors, caught = through_cache(cache, w)
    assert_same(factors, fresh(w))
    assert len(caught) == 1 and "was not written" in str(caught[0].message)
    assert no_temporary_files(tmp_path) and entry_path(cache, w).is_dir()


# -- poisoned entries ------------------------------------------------------------------------------------------
def test_truncated_file(tmp_path):
    w = weight()
    through_cache(SVDCache(tmp_path), w)
    path = entry_path(SVDCache(tmp_path), w)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_poisoned_entry_is_a_miss(tmp_path, w, "unreadable")


@pytest.mark.parametrize("content", [b"", b"not safetensors", os.urandom(4096)], ids=["empty", "text", "random"])
def test_garbage_file(tmp_path, content):
    w = weight()
    path = entry_path(SVDCache(tmp_path), w)
    path.write_bytes(content)
    assert_poisoned_entry_is_a_miss(tmp_path, w, "rejected")


def test_foreign_entry_renamed_to_an_expected_name(tmp_path):
    w, other = weight(0), weight(1)
    cache = SVDCache(tmp_path)
    through_cache(cache, other)
    os.replace(entry_path(cache, other), entry_path(cache, w))
    _, factors = assert_poisoned_entry_is_a_miss(tmp_path, w, "computed from another weight")
    assert not torch.allclose(factors[1], fresh(other)[1])


def test_foreign_entry_with_its_record_edited_to_match(tmp_path):
    w, other = weight(0), weight(1)
    path = entry_path(SVDCache(tmp_path), w)
    through_cache(SVDCache(tmp_path), other)
    tensors, metadata = read_entry(entry_path(SVDCache(tmp_path), other))
    record = entry_record(weight_fingerprint(w), (M, N), RANK, EXACT)
    write_entry(path, tensors, record, checksum=metadata["checksum"])  # the checksum binds tensors to their record
    assert_poisoned_entry_is_a_miss(tmp_path, w, "checksum mismatch")


def test_a_file_of_another_program_with_the_expected_tensor_names(tmp_path):
    w = weight()
    write_entry(entry_path(SVDCache(tmp_path), w), good_tensors(w), {}, checksum="")
    assert_poisoned_entry_is_a_miss(tmp_path, w, "not an entry of this cache format")


@pytest.mark.parametrize("tensor", ["U", "S", "Vh"])
def test_edited_tensor(tmp_path, tensor):
    w = weight()
    through_cache(SVDCache(tmp_path), w)
    path = entry_path(SVDCache(tmp_path), w)
    tensors, metadata = read_entry(path)
    tensors[tensor] = tensors[tensor].clone()
    tensors[tensor].view(-1)[0] *= 1.5  # still finite and S still descending: only the checksum can tell
    save_file(tensors, str(path), metadata=metadata)
    assert_poisoned_entry_is_a_miss(tmp_path, w, "checksum mismatch")


@pytest.mark.parametrize(
    "bad",
    [
        {"U": (M, RANK + 1)},
        {"U": (M - 1, RANK)},
        {"S": (RANK + 1,)},
        {"S": (1, RANK)},
        {"Vh": (RANK, N + 1)},
        {"Vh": (N, RANK)},
    ],
    ids=["U-cols", "U-rows", "S-long", "S-2d", "Vh-cols", "Vh-transposed"],
)
def test_wrong_shapes(tmp_path, bad):
    w = weight()
    tensors = good_tensors(w)
    for name, shape in bad.items():
        tensors[name] = torch.rand(shape)
    write_entry(entry_path(SVDCache(tmp_path), w), tensors, entry_record(weight_fingerprint(w), (M, N), RANK, EXACT))
    assert_poisoned_entry_is_a_miss(tmp_path, w, "wrong shapes")


def test_missing_or_extra_tensors(tmp_path):
    w = weight()
    tensors = good_tensors(w)
    tensors["extra"] = torch.zeros(1)
    record = entry_record(weight_fingerprint(w), (M, N), RANK, EXACT)
    write_entry(entry_path(SVDCache(tmp_path), w), tensors, record, checksum="0")
    assert_poisoned_entry_is_a_miss(tmp_path, w, "wrong tensors")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("tensor", ["U", "S", "Vh"])
def test_non_finite_values(tmp_path, tensor, value):
    w = weight()
    tensors = good_tensors(w)
    tensors[tensor].view(-1)[-1] = value
    write_entry(entry_path(SVDCache(tmp_path), w), tensors, entry_record(weight_fingerprint(w), (M, N), RANK, EXACT))
    assert_poisoned_entry_is_a_miss(tmp_path, w, "non-finite")


@pytest.mark.parametrize("settings", [EXACT, SVDSettings(components="minor")], ids=["principal", "minor"])
@pytest.mark.parametrize("edit", ["negative", "ascending"])
def test_singular_values_out_of_order_or_negative(tmp_path, settings, edit):
    w = weight()
    tensors = good_tensors(w, settings=settings)
    tensors["S"] = -tensors["S"] if edit == "negative" else tensors["S"].flip(0)
    record = entry_record(weight_fingerprint(w), (M, N), RANK, settings)
    write_entry(entry_path(SVDCache(tmp_path), w, settings=settings), tensors, record)
    assert_poisoned_entry_is_a_miss(tmp_path, w, "descending", settings=settings)


def test_not_fp32(tmp_path):
    w = weight()
    tensors = {k: v.half() for k, v in good_tensors(w).items()}
    write_entry(entry_path(SVDCache(tmp_path), w), tensors, entry_record(weight_fingerprint(w), (M, N), RANK, EXACT))
    assert_poisoned_entry_is_a_miss(tmp_path, w, "not fp32")


@pytest.mark.parametrize(
    "field,value",
    [
        ("format", "subspace_peft.svd_cache.v1"),
        ("fingerprint", "0" * 32),
        ("weight_shape", f"{N}x{M}"),
        ("weight_shape", "garbage"),
        ("rank", str(RANK + 1)),
        ("settings", "randomized-niter2-p16-seed0"),
        ("format", None),
        ("fingerprint", None),
    ],
)
def test_wrong_metadata(tmp_path, field, value):
    w = weight()
    record = entry_record(weight_fingerprint(w), (M, N), RANK, EXACT)
    if value is None:
        del record[field]
    else:
        record[field] = value
    # the checksum matches the tensors and the edited record: only the record comparison can tell
    checksum = entry_checksum(good_tensors(w), {**{k: "" for k in entry_record("", (1, 1), 1, EXACT)}, **record})
    write_entry(entry_path(SVDCache(tmp_path), w), good_tensors(w), record, checksum=checksum)
    assert_poisoned_entry_is_a_miss(tmp_path, w, "rejected")


def test_no_metadata_at_all(tmp_path):
    w = weight()
    save_file(good_tensors(w), str(entry_path(SVDCache(tmp_path), w)))  # what version 1 of the cache wrote
    assert_poisoned_entry_is_a_miss(tmp_path, w, "older version or foreign file")


# -- warn once, then heal --------------------------------------------------------------------------------------
def test_one_warning_per_cache_and_reason(tmp_path):
    weights = [weight(seed) for seed in range(3)]
    for w in weights:
        entry_path(SVDCache(tmp_path), w).write_bytes(b"garbage")
    cache = SVDCache(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = truncated_svds(
            {str(i): w for i, w in enumerate(weights)}, {str(i): RANK for i in range(3)}, EXACT, cache
        )
    assert len([c for c in caught if issubclass(c.category, SVDCacheWarning)]) == 1
    for i, w in enumerate(weights):
        assert_same(results[str(i)], fresh(w))
    # another reason on the same cache warns once more; another cache object warns again
    other = weight(7)
    path = entry_path(cache, other)
    tensors = good_tensors(other)
    tensors["S"] = tensors["S"].flip(0)
    write_entry(path, tensors, entry_record(weight_fingerprint(other), (M, N), RANK, EXACT))
    _, caught = through_cache(cache, other)
    assert len(caught) == 1 and "descending" in str(caught[0].message)
    entry_path(cache, weights[0]).write_bytes(b"garbage again")
    _, caught = through_cache(cache, weights[0])
    assert not caught  # unreadable again: already reported by this cache object
    entry_path(cache, weights[0]).write_bytes(b"garbage once more")
    _, caught = through_cache(SVDCache(tmp_path), weights[0])
    assert len(caught) == 1  # a new cache object reports it again


def test_rejected_entry_is_overwritten_by_a_good_one(tmp_path, monkeypatch):
    w = weight()
    through_cache(SVDCache(tmp_path), w)
    path = entry_path(SVDCache(tmp_path), w)
    tensors, metadata = read_entry(path)
    tensors["U"] = tensors["U"] * 2
    save_file(tensors, str(path), metadata=metadata)
    assert_poisoned_entry_is_a_miss(tmp_path, w, "checksum mismatch")  # recomputes and puts a good entry
    healed, metadata = read_entry(path)
    assert metadata["checksum"] == entry_checksum(healed, metadata)
    assert_same((healed["U"], healed["S"], healed["Vh"]), fresh(w))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]

    def no_svd(*args, **kwargs):
        raise AssertionError("the healed entry should have answered")

    expected = fresh(w)
    monkeypatch.setattr("subspace_peft.linalg.svd.truncated_svd_batched", no_svd)
    factors, caught = through_cache(SVDCache(tmp_path), w)
    assert not caught
    assert_same(factors, expected)


def test_put_refuses_factors_that_get_would_reject(tmp_path):
    w = weight()
    u, s, vh = fresh(w)
    cache = SVDCache(tmp_path)
    with pytest.warns(SVDCacheWarning, match="non-finite"):
        assert not cache.put(weight_fingerprint(w), RANK, EXACT, (u, s * float("nan"), vh), shape=(M, N))
    with pytest.warns(SVDCacheWarning, match="wrong shapes"):
        assert not cache.put(weight_fingerprint(w), RANK, EXACT, (u, s, vh), shape=(M, N + 1))
    assert list(tmp_path.iterdir()) == []
    assert cache.put(weight_fingerprint(w), RANK, EXACT, (u, s, vh), shape=(M, N))
    assert cache.get(weight_fingerprint(w), RANK, EXACT, CPU, shape=(M, N)) is not None


# -- bundles: one file per call with several weights ---------------------------------------------------------------
def several(count: int = 3) -> dict[str, torch.Tensor]:
    return {f"layer{i}": weight(10 + i, m=M + i, n=N) for i in range(count)}


def bundles(folder: Path) -> list[Path]:
    return sorted(folder.glob("bundle-*.safetensors"))


def test_a_call_with_several_weights_is_answered_from_one_bundle(tmp_path, monkeypatch):
    weights = several()
    ranks = dict.fromkeys(weights, RANK)
    first = truncated_svds(weights, ranks, EXACT, SVDCache(tmp_path))
    assert len(bundles(tmp_path)) == 1
    assert len(list(tmp_path.glob("*.safetensors"))) == 1 + len(weights)  # the bundle and one entry per weight

    def no_entry(*args, **kwargs):
        raise AssertionError("the bundle should have answered")

    monkeypatch.setattr(SVDCache, "get", no_entry)
    monkeypatch.setattr("subspace_peft.linalg.svd.truncated_svd_batched", no_entry)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SVDCacheWarning)
        second = truncated_svds(weights, ranks, EXACT, SVDCache(tmp_path))
    for name in weights:
        assert all(torch.equal(a, b) for a, b in zip(first[name], second[name]))


def test_a_bundle_answers_only_the_exact_set_it_was_written_for(tmp_path):
    weights = several()
    ranks = dict.fromkeys(weights, RANK)
    truncated_svds(weights, ranks, EXACT, SVDCache(tmp_path))
    fewer = dict(list(weights.items())[:2])
    truncated_svds(fewer, dict.fromkeys(fewer, RANK), EXACT, SVDCache(tmp_path))  # entry hits, and its own bundle
    truncated_svds(weights, dict.fromkeys(weights, RANK + 1), EXACT, SVDCache(tmp_path))
    assert len(bundles(tmp_path)) == 3


@pytest.mark.parametrize("tamper", ["edited tensor", "other weights' bundle", "garbage"])
def test_a_poisoned_bundle_falls_back_to_the_entries(tmp_path, tamper):
    weights = several()
    ranks = dict.fromkeys(weights, RANK)
    truncated_svds(weights, ranks, EXACT, SVDCache(tmp_path))
    (path,) = bundles(tmp_path)
    if tamper == "edited tensor":
        tensors, metadata = read_entry(path)
        tensors["0.S"] = tensors["0.S"] * 2  # still descending, positive and finite: only the checksum sees it
        save_file(tensors, str(path), metadata=metadata)
        reason = "checksum mismatch"
    elif tamper == "other weights' bundle":
        other = {f"other{i}": weight(50 + i, m=M + i, n=N) for i in range(3)}
        truncated_svds(other, dict.fromkeys(other, RANK), EXACT, SVDCache(tmp_path / "other"))
        os.replace(bundles(tmp_path / "other")[0], path)
        reason = "a bundle of another format or for other weights"
    else:
        path.write_bytes(b"\x00" * 64)
        reason = "unreadable"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = truncated_svds(weights, ranks, EXACT, SVDCache(tmp_path))
    messages = [str(c.message) for c in caught if issubclass(c.category, SVDCacheWarning)]
    assert len(messages) == 1 and reason in messages[0], messages
    for name, w in weights.items():
        assert_same(got[name], fresh(w))
    assert read_entry(path)[1]["format"] == cache_module.BUNDLE_FORMAT  # rewritten from the good entries
    with warnings.catch_warnings():
        warnings.simplefilter("error", SVDCacheWarning)
        truncated_svds(weights, ranks, EXACT, SVDCache(tmp_path))


# -- the NaN/Inf check of a cached init ----------------------------------------------------------------------------
@pytest.mark.parametrize("config_cls", ["PiSSAConfig", "EffortConfig", "SVFitConfig"])
def test_a_cached_init_checks_for_nan_only_the_weights_it_computes(tmp_path, monkeypatch, config_cls):
    import math

    from peft import get_peft_model

    import subspace_peft
    import subspace_peft.tuners.base.targets as targets_module

    from parity import assert_refused_unchanged
    from tiny_models import MLP

    rank = {"PiSSAConfig": "r", "EffortConfig": "residual_rank", "SVFitConfig": "r"}[config_cls]

    def config():
        return getattr(subspace_peft, config_cls)(**{rank: 2}, target_modules=["lin0", "lin1"], svd_cache=str(tmp_path))

    torch.manual_seed(0)
    base = MLP()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    get_peft_model(base, config())  # fills the cache
    checked = []
    real = targets_module.all_finite
    monkeypatch.setattr(targets_module, "all_finite", lambda t: checked.append(tuple(t.shape)) or real(t))
    hit = MLP()
    hit.load_state_dict(state)
    get_peft_model(hit, config())
    assert checked == [], "every weight came from the cache: its entry was written from a finite weight"

    poisoned = MLP()
    poisoned.load_state_dict(state)
    with torch.no_grad():
        poisoned.lin1.weight[0, 0] = math.nan  # another fingerprint: a miss, checked before any SVD
    assert_refused_unchanged(poisoned, config, "'lin1' has NaN or Inf")


# -- every method with the cache on: a miss writes, a hit reads, for factors with a strided size-1 dimension ----------
def _rank_one_configs():
    """Rank 1 on a tall (20x10) and a wide (3x20) layer: the rank-1 factors are columns/rows of a transposed SVD,
    whose size-1 dimension keeps a stride (the crash of effort.yaml's `svd_cache: true` on SmolLM2)."""
    from subspace_peft import EffortConfig, PiSSAConfig, SVFitConfig

    targets = ["lin0", "lin1", "lin2"]
    return {
        "pissa": lambda cache: PiSSAConfig(r=1, target_modules=targets, svd_cache=cache),
        "pissa-randomized": lambda cache: PiSSAConfig(r=1, target_modules=targets, init="randomized", svd_cache=cache),
        "svfit": lambda cache: SVFitConfig(r=1, target_modules=targets, svd_cache=cache),
        "effort": lambda cache: EffortConfig(residual_rank=1, target_modules=targets, svd_cache=cache),
    }


def test_every_method_with_a_cache_setting_is_covered():
    import subspace_peft

    with_cache = {m.name for m in subspace_peft.METHODS if "svd_cache" in m.config_cls.__dataclass_fields__}
    assert with_cache == {name.split("-")[0] for name in _rank_one_configs()}


@pytest.mark.parametrize("method", sorted(_rank_one_configs()))
def test_every_method_misses_then_hits_the_cache_with_rank_one_factors(tmp_path, monkeypatch, method):
    from peft import get_peft_model

    import subspace_peft.linalg.svd as svd_module

    from tiny_models import MLP

    make = _rank_one_configs()[method]
    torch.manual_seed(0)
    base = MLP()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    x = torch.randn(5, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SVDCacheWarning)
        miss = get_peft_model(base, make(str(tmp_path)))
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written and all(name.endswith(".safetensors") for name in written), written

    def no_svd(*args, **kwargs):
        raise AssertionError("a cache hit runs no SVD")

    monkeypatch.setattr(svd_module, "truncated_svd_batched", no_svd)
    again = MLP()
    again.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SVDCacheWarning)
        hit = get_peft_model(again, make(str(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == written, "a hit writes nothing"
    miss_state, hit_state = miss.state_dict(), hit.state_dict()
    assert miss_state.keys() == hit_state.keys()
    for key in miss_state:
        assert torch.equal(miss_state[key], hit_state[key]), key
    with torch.no_grad():
        assert torch.equal(miss(x), hit(x))
