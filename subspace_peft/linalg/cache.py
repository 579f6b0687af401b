"""On-disk cache of truncated SVD factors, so initialising the same base model twice skips the SVD.

One safetensors file per (weight, rank, settings). The key is an xxh3-128 digest of the weight's raw bytes,
shape and dtype together with the rank and the SVD settings: any change to the weight gives another key.
Files are written to a temporary name and renamed, so a crash mid-write never leaves a half file behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import xxhash
from safetensors.torch import load_file, save_file

from .svd import SVDSettings


def cache_root() -> Path:
    """``$SUBSPACE_PEFT_CACHE``, else ``$XDG_CACHE_HOME/subspace_peft`` (``~/.cache/subspace_peft``)."""
    root = os.environ.get("SUBSPACE_PEFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "subspace_peft"
    )
    return Path(root)


def default_cache_dir() -> Path:
    return cache_root() / "svd"


def weight_fingerprint(weight: torch.Tensor) -> str:
    """xxh3-128 of the weight's bytes, shape and dtype (runs at memory bandwidth, ~10 GB/s)."""
    data = weight.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    data = data.contiguous()
    digest = xxhash.xxh3_128()
    digest.update(f"{tuple(data.shape)}|{data.dtype}|".encode())
    # viewing as uint8 keeps bf16/fp8 hashable through numpy
    digest.update(data.view(torch.uint8).reshape(-1).numpy())
    return digest.hexdigest()


class SVDCache:
    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    def _path(self, fingerprint: str, rank: int, settings: SVDSettings) -> Path:
        return self.directory / f"{fingerprint}-r{rank}-{settings.key()}.safetensors"

    def get(self, fingerprint: str, rank: int, settings: SVDSettings, device: torch.device):
        path = self._path(fingerprint, rank, settings)
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path), device=str(device))
        except Exception:  # a corrupt or foreign file is a miss, never an error
            return None
        if set(tensors) != {"U", "S", "Vh"} or tensors["S"].shape != (rank,):
            return None
        return tensors["U"], tensors["S"], tensors["Vh"]

    def put(self, fingerprint: str, rank: int, settings: SVDSettings, factors) -> None:
        u, s, vh = factors
        path = self._path(fingerprint, rank, settings)
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"U": u.contiguous().cpu(), "S": s.contiguous().cpu(), "Vh": vh.contiguous().cpu()}, str(tmp))
        os.replace(tmp, path)
