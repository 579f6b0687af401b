from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from peft.utils.peft_types import PeftType

from ...checks import integer, number
from ..base.config import SVDInitConfig

MAX_QUANT_ITERS = 32  # each iteration is one SVD and one quantisation per layer; LoftQ's papers use 1-5


@dataclass
class PiSSAConfig(SVDInitConfig):
    """Configuration of a PiSSA adapter (Meng et al., 2024, arXiv:2404.02948).

    The adapter is LoRA-shaped, ``delta = s * B @ A`` with ``s = lora_alpha / r``, and starts from the principal
    singular triplets of the base weight: ``A = diag(sqrt(S_r / s)) V_r^T``, ``B = U_r diag(sqrt(S_r / s))``
    (paper eq. 2-3). The frozen residual is ``W_res = W - s * B_0 A_0``.

    subspace-peft keeps the base weight ``W`` untouched and stores the initial factors ``A_0, B_0`` (frozen) beside
    the trainable ``A, B``; the layer computes ``W x + s (B A - B_0 A_0) x``, which is exactly PiSSA's
    ``W_res x + s B A x``. Because ``W`` never changes, ``disable_adapter()``, ``unload()`` and
    ``delete_adapter()`` give back the original model, several adapters can share a layer, and reload needs no SVD.

    Args:
        r: rank of the adapter.
        lora_alpha: scaling numerator, ``s = lora_alpha / r``. PiSSA's default is ``lora_alpha == r`` (s = 1).
        lora_dropout: dropout on the adapter's input.
        bias: ``"none"``, ``"all"`` or ``"pissa_only"``: which biases train.
        fan_in_fan_out: set for layers storing the weight as (in, out), e.g. GPT-2's Conv1D (set automatically).
        rank_pattern / alpha_pattern: per-module overrides of ``r`` / ``lora_alpha`` (regex on module name).
        residual_quantization: ``None``, ``"nf4"``, ``"fp4"`` or ``"int8"``. With it set, the base weight of each
            adapted nn.Linear is replaced by the bitsandbytes-quantised residual ``Q(W - s B_0 A_0)`` (QPiSSA). The
            base must be loaded in full precision: the residual is computed before quantisation.
        residual_quant_storage: the dtype nf4/fp4 residuals are stored in: ``None`` (uint8, bitsandbytes' default) or
            ``"float32"``, ``"bfloat16"``, ``"float16"``. FSDP over a QPiSSA model needs the dtype FSDP shards the
            other parameters in (the same as ``BitsAndBytesConfig(bnb_4bit_quant_storage=...)`` for QLoRA).
        residual_quant_iters: QPiSSA only: how many times the init alternates between the rank-r SVD of
            ``W - Q`` and the quantisation ``Q = Q(W - s B A)`` (LoftQ's Algorithm 1 started from PiSSA's factors),
            1 to 32. 1 (the default) is plain QPiSSA. Only the saved factors change: reload runs no iteration.
    """

    r: int = field(
        default=8,
        metadata={
            "help": (
                "Rank of the adapter (a positive int): the number of principal singular components each adapted layer "
                "starts from, e.g. 8-64."
            )
        },
    )
    lora_alpha: int = field(
        default=8,
        metadata={
            "help": (
                "Scaling numerator (> 0): the update is scaled by lora_alpha / r. PiSSA's default is lora_alpha = r "
                "(scale 1)."
            )
        },
    )
    lora_dropout: float = field(
        default=0.0,
        metadata={"help": ("Dropout probability on the adapter's input, in [0, 1); 0 switches dropout off.")},
    )
    bias: Literal["none", "all", "pissa_only"] = field(
        default="none",
        metadata={"help": ("Which biases train: 'none', 'all' or 'pissa_only' (those of the adapted layers only).")},
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={
            "help": (
                "Set for layers storing their weight as (in, out), e.g. GPT-2's Conv1D; set automatically for those."
            )
        },
    )
    rank_pattern: Optional[dict] = field(
        default_factory=dict,
        metadata={
            "help": ("Per-module override of r: a mapping from a module-name regex to its rank, e.g. {'q_proj': 16}.")
        },
    )
    alpha_pattern: Optional[dict] = field(
        default_factory=dict,
        metadata={
            "help": ("Per-module override of lora_alpha: a mapping from a module-name regex to its alpha (> 0).")
        },
    )
    residual_quantization: Optional[Literal["nf4", "fp4", "int8"]] = field(
        default=None,
        metadata={
            "help": (
                "QPiSSA: None (off), 'nf4', 'fp4' or 'int8' replaces each adapted Linear's base weight by the "
                "bitsandbytes-quantised residual. Load the base model in full precision."
            )
        },
    )
    residual_quant_storage: Optional[Literal["uint8", "float32", "bfloat16", "float16"]] = field(
        default=None,
        metadata={
            "help": (
                "Storage dtype of nf4/fp4 residuals: None or 'uint8' (bitsandbytes' default), 'float32', 'bfloat16' or "
                "'float16'. Under FSDP use the dtype FSDP shards the other parameters in."
            )
        },
    )

    residual_quant_iters: int = field(
        default=1,
        metadata={
            "help": (
                f"QPiSSA only: alternations (1-{MAX_QUANT_ITERS}) between the rank-r SVD of W - Q and Q = quant(W - "
                "s B A), as LoftQ does; 1 is plain QPiSSA, 5 lowers the quantisation error further. Reload does not "
                "iterate."
            )
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.PISSA
        if self.bias not in ("none", "all", "pissa_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'pissa_only', got {self.bias!r}")
        if self.residual_quantization not in (None, "nf4", "fp4", "int8"):
            raise ValueError(
                f"residual_quantization must be None, 'nf4', 'fp4' or 'int8', got {self.residual_quantization!r}"
            )
        if self.residual_quant_storage not in (None, "uint8", "float32", "bfloat16", "float16"):
            raise ValueError(
                "residual_quant_storage must be None, 'uint8', 'float32', 'bfloat16' or 'float16', got "
                f"{self.residual_quant_storage!r}"
            )
        if self.residual_quant_storage is not None and self.residual_quantization not in ("nf4", "fp4"):
            raise ValueError(
                "residual_quant_storage applies to 4-bit residuals only: set residual_quantization='nf4' or 'fp4', "
                "or drop residual_quant_storage"
            )
        where = "PiSSAConfig"
        integer(
            where,
            "residual_quant_iters",
            self.residual_quant_iters,
            "1 is plain QPiSSA, 5 is LoftQ's usual choice",
            low=1,
            high=MAX_QUANT_ITERS,
        )
        if self.residual_quant_iters > 1 and not self.residual_quantization:
            raise ValueError(
                f"{where}: residual_quant_iters={self.residual_quant_iters} applies to QPiSSA only (it alternates SVD "
                "and quantisation of the residual): set residual_quantization='nf4', 'fp4' or 'int8', or leave "
                "residual_quant_iters at 1"
            )
        integer(where, "r", self.r, "pass the adapter rank, e.g. r=16", low=1)
        alpha_fix = "the scale is lora_alpha / r; PiSSA's default is lora_alpha = r (scale 1)"
        number(where, "lora_alpha", self.lora_alpha, alpha_fix, low=0, low_open=True)
        for pattern, rank in (self.rank_pattern or {}).items():
            integer(where, f"rank_pattern[{pattern!r}]", rank, "ranks are positive integers", low=1)
        for pattern, alpha in (self.alpha_pattern or {}).items():
            number(where, f"alpha_pattern[{pattern!r}]", alpha, alpha_fix, low=0, low_open=True)
        number(where, "lora_dropout", self.lora_dropout, "0 switches dropout off", low=0, high=1, high_open=True)
