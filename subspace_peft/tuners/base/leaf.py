"""Adapter tensors as leaf modules with a ``.weight``, so FSDP1 with ``use_orig_params=False`` can wrap them. Trained
tensors are parameters; frozen ones (initial values, fixed singular vectors) are buffers, as in peft's own tuners,
so every parameter an adapter owns trains. Either way the state-dict key is ``<module>.weight``."""

from __future__ import annotations

import torch
from torch import nn


class TensorLeaf(nn.Module):
    """One tensor as ``self.weight``: the given one, or an uninitialised one of the given shape (the owner fills it
    in); a parameter if ``trainable``, else a (saved) buffer."""

    def __init__(
        self, shape_or_weight: tuple[int, ...] | int | torch.Tensor, device=None, trainable: bool = True
    ) -> None:
        super().__init__()
        weight = shape_or_weight
        if not isinstance(weight, torch.Tensor):
            weight = torch.empty(shape_or_weight, device=device)
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
