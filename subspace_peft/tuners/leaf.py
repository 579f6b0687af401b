"""Trainable tensors as leaf modules with a ``.weight``, so FSDP1 with ``use_orig_params=False`` can wrap them."""

from __future__ import annotations

import torch
from torch import nn


class TensorLeaf(nn.Module):
    """One tensor of the given shape as ``self.weight`` (uninitialised; the owner fills it in)."""

    def __init__(self, shape: tuple[int, ...] | int, device=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape, device=device))

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}"
