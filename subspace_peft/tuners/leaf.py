"""Trainable tensors as leaf modules with a ``.weight``, so FSDP1 with ``use_orig_params=False`` can wrap them."""

from __future__ import annotations

import torch
from torch import nn


class TensorLeaf(nn.Module):
    """One tensor as ``self.weight``: the given one, or an uninitialised one of the given shape (the owner fills it
    in)."""

    def __init__(self, shape_or_weight: tuple[int, ...] | int | torch.Tensor, device=None) -> None:
        super().__init__()
        weight = shape_or_weight
        if not isinstance(weight, torch.Tensor):
            weight = torch.empty(shape_or_weight, device=device)
        self.weight = nn.Parameter(weight)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}"
