"""Adapter tensors as leaf modules with a ``.weight``, so FSDP1 with ``use_orig_params=False`` can wrap them. Trained
tensors are parameters; frozen ones (initial values, fixed singular vectors) are buffers, as in peft's own tuners,
so every parameter an adapter owns trains. Either way the state-dict key is ``<module>.weight``."""

from __future__ import annotations

import torch
from torch import nn

UNFILLED = float("nan")  # what a tensor built for a checkpoint holds until the checkpoint fills it in


def unfilled(tensor: torch.Tensor) -> bool:
    """Whether a tensor built for a checkpoint still waits for it (any NaN left, or still on the meta device)."""
    return tensor.device.type == "meta" or bool(torch.isnan(tensor).any())


class TensorLeaf(nn.Module):
    """One tensor as ``self.weight``: the given one, or one of the given shape for a checkpoint to fill in (NaN until
    then, so that a tensor nobody filled is seen, never used); a parameter if ``trainable``, else a (saved) buffer."""

    def __init__(
        self, shape_or_weight: tuple[int, ...] | int | torch.Tensor, device=None, trainable: bool = True
    ) -> None:
        super().__init__()
        weight = shape_or_weight
        if not isinstance(weight, torch.Tensor):
            weight = torch.full(
                (shape_or_weight,) if isinstance(shape_or_weight, int) else shape_or_weight, UNFILLED, device=device
            )
        if trainable:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}"


class SingularValues(TensorLeaf):
    """r singular values as a leaf module with a ``.weight`` (so FSDP1 with use_orig_params=False can wrap it)."""

    def __init__(self, r: int, device=None, trainable: bool = True) -> None:
        super().__init__((r,), device, trainable)

    def extra_repr(self) -> str:
        return f"r={self.weight.shape[0]}"
