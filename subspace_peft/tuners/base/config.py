"""Fields our methods share: which layers to adapt (every method) and how the SVD is computed (SVD-initialised ones).

A config read from a saved adapter (``adapter_config.json``, from disk or the Hub) is untrusted data. Every numeric
field is checked and bounded when the config is built, and a config loaded through ``from_pretrained`` (what
``PeftModel.from_pretrained`` and ``load_adapter`` call) is marked: its tuner builds empty layers that the checkpoint
fills in, with no SVD, no cache and no file written.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from ...checks import SEED_MAX, integer
from ...linalg.settings import SVDSettings

# Compute bounds for values a config file can set (a randomized SVD costs (2 niter + 2) passes over the weight).
MAX_NITER = 64
MAX_OVERSAMPLE = 4096


def is_saved_adapter_config(config) -> bool:
    """Whether ``config`` was read from a saved adapter by ``from_pretrained`` and its weights are still to be loaded
    from that adapter's checkpoint."""
    return getattr(config, "_weights_from_checkpoint", False)


def expect_checkpoint(config) -> None:
    """``config``'s adapter is built empty: its weights come from a checkpoint (or are filled in directly)."""
    config._weights_from_checkpoint = True


def mark_checkpoint_loaded(config) -> None:
    """The checkpoint of a saved-adapter config has been loaded: a later ``get_peft_model`` with it initialises."""
    config._weights_from_checkpoint = False


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

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": (
                "Modules to adapt: a list of module names (exact or suffix match), a regex (str), or 'all-linear' for "
                "every "
                "linear layer; usually the attention and MLP projections."
            )
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": (
                "Modules never adapted, even where target_modules matches them: a list of module names (exact or "
                "suffix "
                "match) or a regex (str)."
            )
        },
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None,
        metadata={
            "help": (
                "Only adapt the layers with these indices (an int or a list of ints, from 0); None adapts every layer. "
                "Not with a regex target_modules."
            )
        },
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": (
                "Name of the model's list of layers (e.g. 'layers' or 'h'), needed with layers_to_transform when that "
                "list "
                "is not found automatically."
            )
        },
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": ("Extra modules (e.g. a classifier head) trained in full and saved with the adapter.")},
    )

    def __post_init__(self):
        # a saved adapter_config.json passes peft_type as a plain string (a config built in code, or copied from one,
        # has none or the PeftType member): its adapter is built empty for that checkpoint's weights, whichever code
        # read the file (PeftModel.from_pretrained, PeftConfig.from_pretrained in transformers' load_adapter, ...)
        if type(self.peft_type) is str:
            expect_checkpoint(self)
        super().__post_init__()
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str (regex).")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        layers = self.layers_to_transform
        for index in [layers] if isinstance(layers, int) else layers or []:
            integer(type(self).__name__, "layers_to_transform", index, "list layer indices from 0", low=0)


@dataclass
class SVDInitConfig(TargetConfig):
    """Shared configuration of the SVD-initialised tuners (PiSSA, SVFit, Effort): the targets (see TargetConfig)
    and how the SVD is computed.

    Args:
        init: ``"svd"`` for an exact SVD, ``"randomized"`` for a seeded randomized SVD (``niter`` power iterations,
            ``oversample`` extra columns, ``seed``). Randomized init is reproducible: the same seed gives the same
            factors whatever the global RNG state, and the saved adapter holds every tensor that reload needs.
        niter: power iterations of the randomized SVD, at most 64.
        oversample: extra columns of the randomized SVD's test matrix, at most 4096.
        svd_cache: ``None`` (no cache), ``True`` (the default folder, ``$SUBSPACE_PEFT_CACHE`` or
            ``~/.cache/subspace_peft/svd``) or a folder path. Cached factors are keyed by the weight's bytes. A
            setting of this machine, not of the adapter: it is not saved with the adapter, and a value found in a saved
            config is ignored (a downloaded file never chooses where this package writes).
    """

    init: Literal["svd", "randomized"] = field(
        default="svd",
        metadata={
            "help": (
                "How the initial SVD is computed: 'svd' (exact, the default) or 'randomized' (a seeded randomized SVD, "
                "faster on large weights; set by niter, oversample and seed). Effort needs 'svd'."
            )
        },
    )
    niter: int = field(
        default=2,
        metadata={
            "help": (
                f"Power iterations of the randomized SVD (0-{MAX_NITER}): more is more accurate and slower; 2-8 is "
                f"typical. "
                "Only with init='randomized'."
            )
        },
    )
    oversample: int = field(
        default=16,
        metadata={
            "help": (
                f"Extra columns of the randomized SVD's test matrix (0-{MAX_OVERSAMPLE}); 16 suits most weights. "
                "Only with init='randomized'."
            )
        },
    )
    seed: int = field(
        default=0,
        metadata={
            "help": (
                "Seed of the randomized SVD's test matrix (a non-negative int): the same seed gives the same factors "
                "whatever the global RNG state."
            )
        },
    )
    svd_cache: Optional[Union[bool, str]] = field(
        default=None,
        metadata={
            "help": (
                "Cache of SVD factors: None (off), True (the default folder, $SUBSPACE_PEFT_CACHE or "
                "~/.cache/subspace_peft/svd) or a folder path. A setting of this machine, never saved with the adapter."
            )
        },
    )

    def __post_init__(self):
        from_saved_dict = self.peft_type is not None  # only a saved config's dict passes peft_type
        super().__post_init__()
        if from_saved_dict and self.svd_cache:
            warnings.warn(
                f"svd_cache={self.svd_cache!r} in a saved adapter config is ignored: the cache folder is a setting of "
                "this machine; pass svd_cache=... in code to use one"
            )
            self.svd_cache = None
        if self.svd_cache is not None and not isinstance(self.svd_cache, (bool, str)):
            raise ValueError(f"svd_cache must be None, True or a folder path (str), got {self.svd_cache!r}")
        if self.init not in ("svd", "randomized"):
            raise ValueError(f"init must be 'svd' or 'randomized', got {self.init!r}")
        where = type(self).__name__
        integer(where, "niter", self.niter, "2-8 power iterations are typical", low=0, high=MAX_NITER)
        integer(where, "oversample", self.oversample, "16 extra columns is the default", low=0, high=MAX_OVERSAMPLE)
        integer(where, "seed", self.seed, "pass e.g. seed=0", low=0, high=SEED_MAX)

    def to_dict(self) -> dict:
        values = super().to_dict()
        values.pop("svd_cache", None)  # a local setting, never part of a saved adapter
        return values

    def svd_settings(self) -> SVDSettings:
        method = "exact" if self.init == "svd" else "randomized"
        return SVDSettings(method=method, niter=self.niter, oversample=self.oversample, seed=self.seed)
