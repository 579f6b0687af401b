from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from peft.utils.peft_types import PeftType

from ...checks import integer, number
from ..base.config import SVDInitConfig

DEFAULT_ENERGY = 0.99  # each layer keeps the singular values holding 99% of its energy unless r or energy is given


@dataclass
class SVFitConfig(SVDInitConfig):
    """Configuration of an SVFit adapter: only the top-r singular values of each adapted weight train.

    ``W = U_r diag(sigma) V_r^T + W_e`` with ``U_r, V_r`` and the remainder ``W_e`` frozen and ``sigma`` (r numbers
    per layer) initialised to the top-r singular values ``sigma_0``. subspace-peft keeps ``W`` and adds
    ``U_r diag(sigma - sigma_0) V_r^T``, which is the same model, so outputs equal the base model's at init. What
    trains is the relative change ``delta`` in ``sigma = sigma_0 (1 + delta)`` (zero at init), so SVFit takes
    learning rates in LoRA's range.

    By default (neither ``r`` nor ``energy`` given) each layer keeps the singular values that hold 99% of its
    energy (``energy=0.99``): on SmolLM2-135M that trains 80,529 numbers over all linear layers, 1/61 of LoRA r=16.

    Args:
        r: number of singular values trained per layer; None (the default) lets ``energy`` decide (ignored where
            ``energy`` or ``rank_pattern`` decides).
        energy: each layer's r is the smallest whose top singular values hold this share of the weight's Frobenius
            energy, sum(sigma_i^2) over the top r divided by sum(sigma_i^2) over all; 0.99 (the paper's) when
            neither ``r`` nor ``energy`` is given. Needs one extra ``svdvals`` per layer at init.
        rank_pattern: per-module override of r (regex on the module name); wins over ``energy``.
        energy_ranks: written by the tuner when ``energy`` chose the ranks (module name -> r), into the adapter's copy
            of this config (``model.peft_config[name]``; the config passed is not changed), and saved with the
            adapter, so that reloading it needs no SVD. Not meant to be set by hand.
        bias: ``"none"``, ``"all"`` or ``"svfit_only"``: which biases train.
    """

    r: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "Number of singular values trained per layer (a positive int), e.g. 8-64; None (default) lets energy "
                "decide (0.99 when energy is not given either); ignored where energy or rank_pattern decides."
            )
        },
    )
    energy: Optional[float] = field(
        default=None,
        metadata={
            "help": (
                "In (0, 1]: each layer's r is the smallest whose top singular values hold this share of the weight's "
                "Frobenius energy; 0.99 (the paper's) when neither r nor energy is given. Costs one svdvals per layer."
            )
        },
    )
    rank_pattern: Optional[dict] = field(
        default_factory=dict,
        metadata={
            "help": ("Per-module override of r: a mapping from a module-name regex to its rank; wins over energy.")
        },
    )
    bias: Literal["none", "all", "svfit_only"] = field(
        default="none",
        metadata={"help": ("Which biases train: 'none', 'all' or 'svfit_only' (those of the adapted layers only).")},
    )
    energy_ranks: Optional[dict] = field(
        default=None,
        metadata={
            "help": (
                "Ranks chosen by energy (module name -> r), written by the tuner and saved with the adapter so that "
                "reloading needs no SVD. Not meant to be set by hand."
            )
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.SVFIT
        where = "SVFitConfig"
        if self.r is None and self.energy is None:
            self.energy = DEFAULT_ENERGY
        if self.r is not None:
            integer(where, "r", self.r, "pass the number of trained singular values, e.g. r=16", low=1)
        if self.energy is not None:
            number(
                where, "energy", self.energy, "e.g. 0.99 for 99% of the spectrum's energy", low=0, low_open=True, high=1
            )
        for field_name, pattern in (("rank_pattern", self.rank_pattern), ("energy_ranks", self.energy_ranks)):
            for key, rank in (pattern or {}).items():
                integer(where, f"{field_name}[{key!r}]", rank, "ranks are positive integers", low=1)
        if self.bias not in ("none", "all", "svfit_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'svfit_only', got {self.bias!r}")
