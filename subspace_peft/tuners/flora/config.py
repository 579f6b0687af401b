from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.utils.peft_types import PeftType

from ...checks import number
from ..base.config import TargetConfig

RankSpec = Union[int, tuple[int, ...], list[int]]


def check_rank_spec(spec: RankSpec, where: str) -> None:
    """A positive int, or a sequence of positive ints (one per mode, ordered (in, out, k_1, ...))."""
    values = [spec] if isinstance(spec, int) else list(spec) if isinstance(spec, (tuple, list)) else None
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError(
            f"{where} must be a positive int or a tuple of positive ints ordered (in, out, k_1, ...), got {spec!r}"
        )


@dataclass
class FLoRAConfig(TargetConfig):
    """Configuration of a FLoRA adapter (Si et al., "FLoRA: Low-Rank Core Space for N-dimension", 2024).

    Each adapted weight ``W`` with N modes gets the update ``scale * G x_1 A_1 x_2 A_2 ... x_N A_N`` (Tucker form): a
    trainable core ``G`` of shape (r_1, ..., r_N), zero at init so outputs equal the base model's, and one trainable
    factor ``A_m`` (size_m, r_m) per mode (Kaiming-uniform init). Linear and Embedding weights have 2 modes, ConvNd
    weights N + 2: for a convolution with ``groups`` the in-channel mode has size ``c_in / groups`` (1 for a
    depthwise convolution), and the forward pass uses the base layer's stride, padding, dilation and groups.

    Ranks are written per mode in the order (in, out, k_1, ..., k_N), as in the official code. An int ``r`` means
    ``min(r, size)`` on every mode; a tuple is taken as given, one entry per mode, each at most the mode's size.

    Args:
        r: rank of every mode of 2-D weights (Linear, Conv1D, Embedding), and of convolutions without ``conv_ranks``.
        conv_ranks: ranks of convolution weights, e.g. ``(16, 16, 2, 2)`` for Conv2d (the official ConvNeXt setting,
            with ``scale=4``); ``(in, out, k)`` for Conv1d, ``(in, out, k_d, k_h, k_w)`` for Conv3d.
        scale: multiplies the update.
        flora_dropout: dropout on the adapter's input (not for Embedding).
        rank_pattern: module-name pattern (regex) -> int or per-mode tuple; wins over ``r`` and ``conv_ranks``.
        bias: ``"none"``, ``"all"`` or ``"flora_only"``: which biases train.
    """

    r: int = field(
        default=8,
        metadata={
            "help": (
                "Rank of every mode (a positive int, capped at each mode's size) of 2-D weights (Linear, Conv1D, "
                "Embedding) and of convolutions without conv_ranks."
            )
        },
    )
    conv_ranks: Optional[tuple[int, ...]] = field(
        default=None,
        metadata={
            "help": (
                "Per-mode ranks of convolution weights, ordered (in, out, k_1, ...), e.g. (16, 16, 2, 2) for Conv2d "
                "(the official ConvNeXt setting, with scale=4)."
            )
        },
    )
    scale: float = field(
        default=1.0,
        metadata={"help": ("Multiplies the update (a float); 1 by default, 4 in the official ConvNeXt setting.")},
    )
    flora_dropout: float = field(
        default=0.0,
        metadata={
            "help": (
                "Dropout probability on the adapter's input, in [0, 1); 0 switches dropout off. Not applied to "
                "Embedding layers."
            )
        },
    )
    rank_pattern: Optional[dict] = field(
        default_factory=dict,
        metadata={
            "help": (
                "Per-module ranks: a mapping from a module-name regex to an int or a per-mode tuple; wins over r and "
                "conv_ranks."
            )
        },
    )
    bias: Literal["none", "all", "flora_only"] = field(
        default="none",
        metadata={"help": ("Which biases train: 'none', 'all' or 'flora_only' (those of the adapted layers only).")},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.FLORA
        check_rank_spec(self.r, "r")
        if not isinstance(self.r, int):
            raise ValueError(f"r must be an int (use conv_ranks or rank_pattern for per-mode ranks), got {self.r!r}")
        if self.conv_ranks is not None:
            check_rank_spec(self.conv_ranks, "conv_ranks")
            if isinstance(self.conv_ranks, int) or len(self.conv_ranks) < 3:
                raise ValueError(
                    f"conv_ranks needs one rank per mode of a convolution weight, ordered (in, out, k_1, ...): at "
                    f"least 3 entries, e.g. (16, 16, 2, 2) for Conv2d; got {self.conv_ranks!r}"
                )
            self.conv_ranks = tuple(self.conv_ranks)
        for pattern, spec in (self.rank_pattern or {}).items():
            check_rank_spec(spec, f"rank_pattern[{pattern!r}]")
        number(
            "FLoRAConfig", "flora_dropout", self.flora_dropout, "0 switches dropout off", low=0, high=1, high_open=True
        )
        number("FLoRAConfig", "scale", self.scale, "the official ConvNeXt setting is scale=4")
        if self.bias not in ("none", "all", "flora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'flora_only', got {self.bias!r}")
