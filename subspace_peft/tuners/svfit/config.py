from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from peft.utils.peft_types import PeftType

from ...checks import integer, number
from ..base.config import SVDInitConfig


@dataclass
class SVFitConfig(SVDInitConfig):
    """Configuration of an SVFit adapter: only the top-r singular values of each adapted weight train.

    ``W = U_r diag(sigma) V_r^T + W_e`` with ``U_r, V_r`` and the remainder ``W_e`` frozen and ``sigma`` (r numbers
    per layer) initialised to the top-r singular values. subspace-peft keeps ``W`` and adds
    ``U_r diag(sigma - sigma_0) V_r^T``, which is the same model, so outputs equal the base model's at init.

    Args:
        r: number of singular values trained per layer (ignored where ``energy`` or ``rank_pattern`` decides).
        energy: if set, each layer's r is the smallest whose top singular values hold this share of the weight's
            Frobenius energy, sum(sigma_i^2) over the top r divided by sum(sigma_i^2) over all (the paper's 0.99).
            Needs one extra ``svdvals`` per layer at init.
        rank_pattern: per-module override of r (regex on the module name); wins over ``energy``.
        energy_ranks: written by the tuner when ``energy`` chose the ranks (module name -> r) and saved with the
            adapter, so that reloading it needs no SVD. Not meant to be set by hand.
        bias: ``"none"``, ``"all"`` or ``"svfit_only"``: which biases train.
    """

    r: int = field(
        default=8,
        metadata={
            "help": (
                "Number of singular values trained per layer (a positive int), e.g. 8-64; ignored where energy or "
                "rank_pattern decides."
            )
        },
    )
    energy: Optional[float] = field(
        default=None,
        metadata={
            "help": (
                "If set, in (0, 1]: each layer's r is the smallest whose top singular values hold this share of the "
                "weight's Frobenius energy (the paper uses 0.99). Costs one extra svdvals per layer."
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
