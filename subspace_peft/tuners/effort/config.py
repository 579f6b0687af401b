from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from peft.utils.peft_types import PeftType

from ...checks import integer, number
from ...linalg.settings import SVDSettings
from ..base.config import SVDInitConfig


@dataclass
class EffortConfig(SVDInitConfig):
    """Configuration of an Effort adapter (Yan et al., "Orthogonal Subspace Decomposition", ICML 2025).

    Each adapted weight is split by its SVD into a frozen principal part ``U_k S_k V_k^T`` (the top
    ``k = min(d_out, d_in) - residual_rank`` components) and the ``residual_rank`` minor components
    ``U_res diag(S_res) V_res^T``, which train. subspace-peft keeps ``W`` and adds
    ``U_res diag(S_res) V_res^T - U_0 diag(S_0) V_0^T`` (the minor part minus its initial value), the same model
    with no frozen copy of the weight, so outputs equal the base model's at init.

    Two regularisers keep the update in the minor subspace; ``model.subspace_loss()`` returns their weighted sum,
    and during training (``model.train()``) its gradient is added to that of whatever loss is computed from the
    model's outputs (Trainer, TRL, a hand-written loop; see :func:`subspace_peft.add_regulariser_callback` for
    logging it). Each is a mean over the adapted layers of a per-layer term normalised to be independent of the
    layer's size, rank and scale, so a weight means the same on any model:

    * ``orth_weight`` * mean of ``(||[U_k U_res]^T [U_k U_res] - I||_F^2 + ||[V_k V_res]^T [V_k V_res] - I||_F^2)
      / (2 r)``: per trained direction and side, about the squared sine of the angle by which it has turned into
      the frozen principal subspace (the ``U^T U - I`` form, right for every weight shape; ``U U^T`` cannot be
      ``I`` when d_out > d_in);
    * ``norm_weight`` * mean of ``| ||W||_F^2 - ||W_0||_F^2 | / ||W_0||_F^2``: the relative change of each
      weight's Frobenius energy (its singular values' squares).

    Both are zero at init. How to pick the weights: ``orth_weight`` is what holds forgetting down; its default
    1e4 prices a turn of sin^2 = 1e-4 (about 0.01 rad) of every trained direction like one unit of task loss. On
    SmolLM2-135M (all linear layers, r=16, lr 1e-3, 80 steps) it gave the lowest forgetting of the LoRA-sized adapters
    with the regulariser at ~25% of the loss after the first steps (benchmarks/README.md); 1e3 forgot as much as
    LoRA, 1 five times more (+2.0 against +0.38). Raise it to forget less, lower it to fit the task more.
    ``norm_weight`` (default 1) prices a 1% change of a weight's energy at 0.01; on that benchmark weights up to 1e3
    changed neither fit nor forgetting. Log ``effort_orth`` and ``effort_norm`` (the callback does) to see which term
    binds. The defaults assume an adaptive optimizer (AdamW, the Trainer's default), whose steps stay near the
    learning rate; under plain SGD the regulariser's gradient at 1e4 takes huge steps: lower the rate or the weights.

    Args:
        residual_rank: number of minor singular components trained per layer (the paper uses 1 per attention
            projection). Must be smaller than min(d_out, d_in).
        rank_pattern: per-module override of ``residual_rank`` (regex on the module name).
        orth_weight: weight of the orthogonality loss (mean over layers, per direction; see above).
        norm_weight: weight of the singular-value (energy) preservation loss (mean over layers, relative).
        bias: ``"none"``, ``"all"`` or ``"effort_only"``: which biases train.
        init: must be ``"svd"``: minor components need an exact SVD.
    """

    residual_rank: int = field(
        default=1,
        metadata={
            "help": (
                "Minor singular components trained per layer (a positive int, below min(d_out, d_in)); the paper uses "
                "1 "
                "per attention projection."
            )
        },
    )
    rank_pattern: Optional[dict] = field(
        default_factory=dict,
        metadata={"help": ("Per-module override of residual_rank: a mapping from a module-name regex to its rank.")},
    )
    orth_weight: float = field(
        default=1e4,
        metadata={
            "help": (
                "Weight (>= 0) of the orthogonality loss (mean over layers of the per-direction squared sine of the "
                "turn into the principal subspace) that keeps the update in the minor subspace; 0 switches it off."
            )
        },
    )
    norm_weight: float = field(
        default=1.0,
        metadata={
            "help": (
                "Weight (>= 0) of the singular-value preservation loss (mean over layers of the relative change of "
                "the weight's Frobenius energy); 0 switches it off."
            )
        },
    )
    bias: Literal["none", "all", "effort_only"] = field(
        default="none",
        metadata={"help": ("Which biases train: 'none', 'all' or 'effort_only' (those of the adapted layers only).")},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.EFFORT
        where = "EffortConfig"
        integer(where, "residual_rank", self.residual_rank, "the paper uses 1", low=1)
        for pattern, rank in (self.rank_pattern or {}).items():
            integer(where, f"rank_pattern[{pattern!r}]", rank, "ranks are positive integers", low=1)
        for name in ("orth_weight", "norm_weight"):
            number(where, name, getattr(self, name), "0 switches that loss off", low=0)
        if self.bias not in ("none", "all", "effort_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'effort_only', got {self.bias!r}")

    def svd_settings(self) -> SVDSettings:
        if self.init != "svd":
            raise ValueError(
                "Effort trains the minor singular components, which only an exact SVD finds: use init='svd' "
                f"(got init={self.init!r})"
            )
        return SVDSettings(method="exact", components="minor")
