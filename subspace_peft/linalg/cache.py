"""On-disk cache of truncated SVD factors, so initialising the same base model twice skips the SVD.

One safetensors file per (weight, rank, settings). The file name holds an xxh3-128 fingerprint of the weight's raw
bytes, shape and dtype together with the rank and the SVD settings: any change to the weight gives another name.

The cache can never change a result, only skip work. Each entry records in its safetensors metadata what it was
computed from (the weight's fingerprint and shape, the rank, the settings key and the entry format) and an xxh3-128
checksum of its own tensors and of that record. :meth:`SVDCache.get` returns an entry only when the record matches
the request exactly and the factors are what a truncated SVD of that weight returns: ``U`` (m, rank), ``S`` (rank,),
``Vh`` (rank, n), all fp32 and finite, ``S`` non-negative and non-increasing, checksum intact. Anything else (a
truncated or foreign file, an edited tensor, a cache folder that is a file, a read-only or full disk) is a miss or a
skipped write with one :class:`SVDCacheWarning` per cache object and kind of problem, never an exception.

A call that decomposes several weights also writes one *bundle* per model: every entry of the call in one file,
named by a fingerprint of the list of (weight fingerprint, shape, rank) and the settings, so initialising the same
model again opens one file instead of one per layer. A bundle is held to the same checks as each entry (its record
must list exactly the requested entries, checksum over record and tensors, every factor triplet well-formed); a
rejected bundle falls back to the entries, one by one.

Files are written to a temporary name and renamed, so a crash mid-write never leaves a half entry behind, and a
failed write removes its temporary file. The checksum covers only the small factors: the weight is hashed once, by
the caller, for its fingerprint.
"""

from __future__ import annotations

import errno
import os
import secrets
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import save_file

from .settings import SVDSettings

# Bump when the layout or the meaning of an entry changes: entries of another format are misses.
FORMAT = "subspace_peft.svd_cache.v2"
BUNDLE_FORMAT = "subspace_peft.svd_cache_bundle.v1"
_NAMES = ("U", "S", "Vh")
_RECORD_KEYS = ("format", "fingerprint", "weight_shape", "rank", "settings")


class SVDCacheWarning(UserWarning):
    """A cache entry was rejected or could not be written; the SVD is (or was) computed instead."""


def cache_root() -> Path:
    """``$SUBSPACE_PEFT_CACHE``, else ``$XDG_CACHE_HOME/subspace_peft`` (``~/.cache/subspace_peft``)."""
    root = os.environ.get("SUBSPACE_PEFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "subspace_peft"
    )
    return Path(root)


def default_cache_dir() -> Path:
    return cache_root() / "svd"


def _raw_bytes(tensor: torch.Tensor):
    """The tensor's bytes in row-major order, as a flat numpy uint8 array (bf16/fp8 included).

    Flattened before the byte view: ``contiguous()`` keeps any stride on a size-1 dimension (a (m, 1) column of a
    transposed matrix stays strided), which ``view(torch.uint8)`` refuses; a flat tensor has stride 1.
    """
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def weight_fingerprint(weight: torch.Tensor) -> str:
    """xxh3-128 of the weight's bytes, shape and dtype (runs at memory bandwidth, ~10 GB/s)."""
    data = weight.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    digest = xxhash.xxh3_128()
    digest.update(f"{tuple(data.shape)}|{data.dtype}|".encode())
    digest.update(_raw_bytes(data))
    return digest.hexdigest()


def entry_record(fingerprint: str, weight_shape: Sequence[int], rank: int, settings: SVDSettings) -> dict[str, str]:
    """What an entry was computed from, as the safetensors metadata strings it is stored (and compared) as."""
    m, n = (int(d) for d in weight_shape)
    return {
        "format": FORMAT,
        "fingerprint": str(fingerprint),
        "weight_shape": f"{m}x{n}",
        "rank": str(int(rank)),
        "settings": settings.key(),
    }


def entry_checksum(tensors: dict[str, torch.Tensor], record: dict[str, str]) -> str:
    """xxh3-128 over the record and each factor's name, shape, dtype and bytes (CPU tensors)."""
    digest = xxhash.xxh3_128()
    for key in _RECORD_KEYS:
        digest.update(f"{key}={record[key]}\n".encode())
    for name in _NAMES:
        tensor = tensors[name]
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        digest.update(_raw_bytes(tensor))
    return digest.hexdigest()


# (weight fingerprint, (m, n), rank): one entry of a bundle
BundleRequest = tuple[str, tuple[int, int], int]


def _unique(requests: Sequence[BundleRequest]) -> list[BundleRequest]:
    """The distinct requests in a canonical order (tied weights share one entry)."""
    return sorted(set(requests))


def bundle_manifest(requests: Sequence[BundleRequest], settings: SVDSettings) -> str:
    """The record of a bundle: its format, the settings and every entry it holds, one per line, in tensor order."""
    lines = [BUNDLE_FORMAT, settings.key()] + [f"{fp} {m}x{n} r{rank}" for fp, (m, n), rank in _unique(requests)]
    return "\n".join(lines)


def bundle_checksum(tensors: dict[str, torch.Tensor], manifest: str) -> str:
    """xxh3-128 over the manifest and each tensor's name, shape, dtype and bytes, in name order."""
    digest = xxhash.xxh3_128()
    digest.update(manifest.encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"\n{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        digest.update(_raw_bytes(tensor))
    return digest.hexdigest()


def _factor_problem(tensors: dict[str, torch.Tensor], m: int, n: int, rank: int) -> Optional[str]:
    """Why ``tensors`` are not the factors of a rank-``rank`` truncated SVD of an (m, n) weight, or None."""
    expected = {"U": (m, rank), "S": (rank,), "Vh": (rank, n)}
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            return "wrong shapes"
    if any(tensors[name].dtype != torch.float32 for name in _NAMES):
        return "not fp32"
    if not all(bool(torch.isfinite(tensors[name]).all()) for name in _NAMES):
        return "non-finite values"
    s = tensors["S"]
    # Principal and minor components alike come out of a LAPACK SVD sorted in descending order, and a slice of
    # a descending sequence (the leading or the trailing ``rank`` values) stays descending.
    if bool((s < 0).any()) or bool((s[1:] > s[:-1]).any()):
        return "singular values negative or not in descending order"
    return None


def _is_fatal(error: BaseException) -> bool:
    return isinstance(error, (KeyboardInterrupt, SystemExit, GeneratorExit))


class SVDCache:
    """A folder of cached truncated SVD factors. Reads and writes never raise; problems warn once per kind."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self._warned: set[str] = set()

    def _path(self, fingerprint: str, rank: int, settings: SVDSettings) -> Path:
        return self.directory / f"{fingerprint}-r{rank}-{settings.key()}.safetensors"

    def _warn(self, reason: str, message: str) -> None:
        if reason in self._warned:
            return
        self._warned.add(reason)
        warnings.warn(message, SVDCacheWarning, stacklevel=3)

    def _reject(self, path: Path, reason: str) -> None:
        self._warn(
            f"reject:{reason}",
            f"SVD cache entry {path} was rejected ({reason}); recomputing the SVD. Further entries rejected for "
            "this reason are not reported.",
        )

    def _not_a_folder(self) -> bool:
        if self.directory.exists() and not self.directory.is_dir():
            self._warn(
                "not a folder",
                f"the SVD cache path {self.directory} is a file, not a folder; the cache is not used (choose a "
                "folder for svd_cache)",
            )
            return True
        return False

    # -- read --------------------------------------------------------------------------------------------------
    def get(
        self,
        fingerprint: str,
        rank: int,
        settings: SVDSettings,
        device: torch.device,
        shape: Optional[Sequence[int]] = None,
    ):
        """Cached ``(U, S, Vh)`` on ``device`` for the weight with this fingerprint and ``shape`` (m, n), or None.

        ``shape`` should always be given: only then is the entry's recorded weight shape checked against the
        request (without it the recorded shape is taken, and the factors are still checked against it).
        """
        path = self._path(fingerprint, rank, settings)
        try:
            if not path.is_file():
                self._not_a_folder()
                return None
        except OSError:
            return None
        try:
            factors = self._read(path, fingerprint, rank, settings, shape)
        except BaseException as error:  # noqa: BLE001 - safetensors' Rust panics are BaseExceptions
            if _is_fatal(error):
                raise
            self._reject(path, f"unreadable: {type(error).__name__}")
            return None
        if factors is None:
            return None
        try:
            return tuple(factors[name].to(device) for name in _NAMES)
        except BaseException as error:  # noqa: BLE001
            if _is_fatal(error):
                raise
            self._warn(
                f"device:{type(error).__name__}",
                f"SVD cache entry {path} could not be moved to {device} ({error}); recomputing the SVD",
            )
            return None

    def _read(self, path: Path, fingerprint: str, rank: int, settings: SVDSettings, shape):
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            record = {key: metadata.get(key) for key in _RECORD_KEYS}
            if shape is None:  # take the recorded shape, then hold the factors to it
                try:
                    m, n = (int(d) for d in str(record["weight_shape"]).split("x"))
                except ValueError:
                    self._reject(path, "does not record what it was computed from")
                    return None
            else:
                m, n = (int(d) for d in shape)
            expected = entry_record(fingerprint, (m, n), rank, settings)
            if record != expected:
                if record["format"] != FORMAT:
                    self._reject(path, "not an entry of this cache format (older version or foreign file)")
                else:
                    self._reject(path, "computed from another weight, rank or settings")
                return None
            if set(handle.keys()) != set(_NAMES):
                self._reject(path, "wrong tensors")
                return None
            for name, want in {"U": [m, rank], "S": [rank], "Vh": [rank, n]}.items():
                part = handle.get_slice(name)
                if list(part.get_shape()) != want:
                    self._reject(path, "wrong shapes")
                    return None
                if part.get_dtype() != "F32":
                    self._reject(path, "not fp32")
                    return None
            tensors = {name: handle.get_tensor(name) for name in _NAMES}
        if metadata.get("checksum") != entry_checksum(tensors, expected):
            self._reject(path, "checksum mismatch")
            return None
        problem = _factor_problem(tensors, m, n, rank)
        if problem is not None:
            self._reject(path, problem)
            return None
        return tensors

    # -- bundles: every entry of one call in one file -----------------------------------------------------------
    def _bundle_path(self, manifest: str, settings: SVDSettings) -> Path:
        return self.directory / f"bundle-{xxhash.xxh3_128_hexdigest(manifest.encode())}-{settings.key()}.safetensors"

    def get_bundle(self, requests: Sequence[BundleRequest], settings: SVDSettings, device: torch.device):
        """``{request: (U, S, Vh)}`` for every request from the bundle written for exactly these requests, or None
        (no bundle, or a rejected one: then ask :meth:`get` for each)."""
        manifest = bundle_manifest(requests, settings)
        path = self._bundle_path(manifest, settings)
        try:
            if not path.is_file():
                return None
            tensors = self._read_bundle(path, manifest, requests)
            if tensors is None:
                return None
            return {
                request: tuple(tensors[f"{i}.{name}"].to(device) for name in _NAMES)
                for i, request in enumerate(_unique(requests))
            }
        except BaseException as error:  # noqa: BLE001 - safetensors' Rust panics are BaseExceptions
            if _is_fatal(error):
                raise
            self._reject(path, f"unreadable: {type(error).__name__}")
            return None

    def _read_bundle(self, path: Path, manifest: str, requests: Sequence[BundleRequest]):
        unique = _unique(requests)
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != BUNDLE_FORMAT or metadata.get("manifest") != manifest:
                self._reject(path, "a bundle of another format or for other weights")
                return None
            expected = {}
            for i, (_, (m, n), rank) in enumerate(unique):
                expected.update({f"{i}.U": [m, rank], f"{i}.S": [rank], f"{i}.Vh": [rank, n]})
            if set(handle.keys()) != set(expected):
                self._reject(path, "wrong tensors")
                return None
            for name, shape in expected.items():
                part = handle.get_slice(name)
                if list(part.get_shape()) != shape or part.get_dtype() != "F32":
                    self._reject(path, "wrong shapes or not fp32")
                    return None
            tensors = {name: handle.get_tensor(name) for name in expected}
        if metadata.get("checksum") != bundle_checksum(tensors, manifest):
            self._reject(path, "checksum mismatch")
            return None
        for i, (_, (m, n), rank) in enumerate(unique):
            problem = _factor_problem({name: tensors[f"{i}.{name}"] for name in _NAMES}, m, n, rank)
            if problem is not None:
                self._reject(path, problem)
                return None
        return tensors

    def put_bundle(self, factors: dict[BundleRequest, tuple], settings: SVDSettings) -> bool:
        """Store every request's ``(U, S, Vh)`` in one bundle; returns whether it was written."""
        requests = list(factors)
        manifest = bundle_manifest(requests, settings)
        tensors = {}
        for i, request in enumerate(_unique(requests)):
            triplet = {
                name: t.detach().to("cpu", torch.float32).contiguous() for name, t in zip(_NAMES, factors[request])
            }
            (m, n), rank = request[1], request[2]
            if _factor_problem(triplet, m, n, rank) is not None:
                return False  # put() has warned about these factors already
            tensors.update({f"{i}.{name}": tensor for name, tensor in triplet.items()})
        metadata = {"format": BUNDLE_FORMAT, "manifest": manifest, "checksum": bundle_checksum(tensors, manifest)}
        return self._write(self._bundle_path(manifest, settings), tensors, metadata)

    # -- write -------------------------------------------------------------------------------------------------
    def put(
        self,
        fingerprint: str,
        rank: int,
        settings: SVDSettings,
        factors,
        shape: Optional[Sequence[int]] = None,
    ) -> bool:
        """Store ``factors`` = ``(U, S, Vh)`` of the (m, n) weight ``shape`` (default: read off U and Vh).

        Returns whether the entry was written. Factors that ``get`` would reject are not written; a folder that is
        a file or cannot be created, a read-only or full disk skip the write with one warning per kind of problem
        and leave no temporary file behind.
        """
        u, s, vh = factors
        if shape is None:
            shape = (u.shape[0], vh.shape[-1])
        m, n = (int(d) for d in shape)
        tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in zip(_NAMES, (u, s, vh))}
        problem = _factor_problem(tensors, m, n, rank)
        if problem is not None:
            self._warn(
                f"invalid:{problem}",
                f"SVD factors of a ({m}, {n}) weight at rank {rank} were not cached ({problem})",
            )
            return False
        record = entry_record(fingerprint, (m, n), rank, settings)
        metadata = dict(record, checksum=entry_checksum(tensors, record))
        return self._write(self._path(fingerprint, rank, settings), tensors, metadata)

    def _write(self, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
        if self._not_a_folder():
            return False
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            self._warn(
                f"mkdir:{type(error).__name__}",
                f"the SVD cache folder {self.directory} could not be created ({error}); the cache is not written",
            )
            return False
        # Not a ``*.safetensors`` name, so a half-written file can never be taken for an entry.
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            save_file(tensors, str(tmp), metadata=metadata)
            os.replace(tmp, path)
        except BaseException as error:  # noqa: BLE001 - includes safetensors' Rust panics
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            if _is_fatal(error):
                raise
            self._warn_write_failed(path, error)
            return False
        return True

    def _warn_write_failed(self, path: Path, error: BaseException) -> None:
        code = getattr(error, "errno", None)
        if isinstance(error, PermissionError) or code in (errno.EACCES, errno.EPERM, errno.EROFS):
            reason, hint = "read-only", "the cache folder is not writable"
        elif code in (errno.ENOSPC, errno.EDQUOT):
            reason, hint = "disk full", "no space left on the cache's disk"
        else:
            reason, hint = f"write:{type(error).__name__}", "the entry could not be written"
        self._warn(
            reason,
            f"SVD cache entry {path} was not written ({hint}: {error}); the SVD is computed, not cached. Further "
            "write failures of this kind are not reported.",
        )
