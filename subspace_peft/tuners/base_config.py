"""Fields our methods share: which layers to adapt (every method) and how the SVD is computed (SVD-initialised ones)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from ..linalg.svd import SVDSettings


@dataclass
class TargetConfig(PeftConfig):
    """Which layers a method adapts, with peft's matching rules.

    Args:
        target_modules: module names (list: exact or suffix match; str: regex) or ``"all-linear"``.
        exclude_modules: module names or regex never adapted.
        layers_to_transform: only adapt these layer indices (with ``layers_pattern`` when the model's layer list is
            not found automatically).
        modules_to_save: extra modules trained in full and saved with the adapter.
    """

    target_modules: Optional[Union[list[str], str]] = field(default=None)
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None)

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str (regex).")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")


@dataclass
class SVDInitConfig(TargetConfig):
    """Shared configuration of the SVD-initialised tuners (PiSSA, SVFit, Effort): the targets (see TargetConfig)
    and how the SVD is computed.

    Args:
        init: ``"svd"`` for an exact SVD, ``"randomized"`` for a seeded randomized SVD (``niter`` power iterations,
            ``oversample`` extra columns, ``seed``). Randomized init is reproducible: the same seed gives the same
            factors whatever the global RNG state, and the saved adapter holds every tensor that reload needs.
        svd_cache: ``None`` (no cache), ``True`` (the default folder, ``$SUBSPACE_PEFT_CACHE`` or
            ``~/.cache/subspace_peft/svd``) or a folder path. Cached factors are keyed by the weight's bytes.
    """

    init: Literal["svd", "randomized"] = field(default="svd")
    niter: int = field(default=2)
    oversample: int = field(default=16)
    seed: int = field(default=0)
    svd_cache: Optional[Union[bool, str]] = field(default=None)

    def __post_init__(self):
        super().__post_init__()
        if self.init not in ("svd", "randomized"):
            raise ValueError(f"init must be 'svd' or 'randomized', got {self.init!r}")
        self.svd_settings()  # validates niter / oversample

    def svd_settings(self) -> SVDSettings:
        method = "exact" if self.init == "svd" else "randomized"
        return SVDSettings(method=method, niter=self.niter, oversample=self.oversample, seed=self.seed)
