"""How a rank-r factor pair ``B A`` is stored and applied on each supported layer type.

Every method's update is built from ``A`` (r, d_in) and ``B`` (d_out, r) matrices of the weight matrix the adapter
factorises (:func:`weight_matrix`). The layer type alone decides how such a pair is shaped as module weights, how
``B diag(scale) A x`` is computed and how a (d_out, d_in) delta is reshaped like the base weight. A tuner layer holds
one geometry object (``self.geometry = geometry_for(base_layer)``) and asks it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
SUPPORTED_TYPES = (nn.Linear, Conv1D, nn.Embedding) + CONV_TYPES
SUPPORTED_NAMES = "nn.Linear, transformers' Conv1D, nn.Conv1d/2d/3d (groups=1) and nn.Embedding"

_POINTWISE_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def full_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """The shape of ``weight`` as the model defines it, also while DeepSpeed ZeRO-3 has partitioned it (then
    ``weight.shape`` is ``(0,)`` and the real shape is ``ds_shape``). FSDP2's DTensor reports its global shape."""
    return tuple(getattr(weight, "ds_shape", None) or weight.shape)


def as_matrix(base: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight``, a whole weight of ``base``'s shape (e.g. gathered from shards), as the (d_out, d_in) matrix the
    adapter factorises (a view, no copy); see :func:`weight_matrix`."""
    if isinstance(base, Conv1D):
        return weight.T
    if isinstance(base, CONV_TYPES):
        return weight.reshape(weight.shape[0], -1)
    if isinstance(base, nn.Embedding):
        return weight.T
    return weight


def weight_matrix(base: nn.Module) -> torch.Tensor:
    """The base weight as the (d_out, d_in) matrix the adapter factorises (a view, no copy).

    Linear: W. Conv1D (GPT-2, stored as (in, out)): W^T. ConvNd: W reshaped to (c_out, c_in * prod(kernel)).
    Embedding (stored as (num_embeddings, dim)): W^T, so that, as in peft's LoRA, B has ``dim`` rows and A has
    ``num_embeddings`` columns.
    """
    return as_matrix(base, base.weight)


def matrix_shape(base: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of :func:`weight_matrix`, read from the shape alone: also right for a weight that DeepSpeed
    ZeRO-3 has partitioned, FSDP2 has sharded or that sits on the meta device."""
    shape = full_shape(base.weight)
    if isinstance(base, (Conv1D, nn.Embedding)):
        return shape[1], shape[0]
    if isinstance(base, CONV_TYPES):
        return shape[0], math.prod(shape[1:])
    return shape[0], shape[1]


class LinearGeometry:
    """nn.Linear, transformers' Conv1D (stored (in, out): ``fan_in_fan_out``) and bitsandbytes Linear layers."""

    supports_dropout = True
    is_conv = False

    def __init__(self, base: nn.Module) -> None:
        self.fan_in_fan_out = isinstance(base, Conv1D)
        if hasattr(base, "out_features"):
            self.d_out, self.d_in = base.out_features, base.in_features
        else:
            self.d_out, self.d_in = matrix_shape(base)
        self.mode_sizes = (self.d_out, self.d_in)

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of the (A, B) module weights of rank ``r``, as :meth:`low_rank` takes them."""
        return (r, self.d_in), (self.d_out, r)

    def low_rank(self, x, a, b, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``B diag(scale) A x`` (``B A x`` without ``scale``) for module-shaped factor weights."""
        hidden = F.linear(x, a)
        return F.linear(hidden if scale is None else hidden * scale, b)

    def project_input(self, x: torch.Tensor, a_in: torch.Tensor) -> torch.Tensor:
        """``x`` times the (d_in, r) matrix ``a_in``."""
        return x @ a_in

    def factor_weights(self, a_matrix: torch.Tensor, b_matrix: torch.Tensor):
        """Module-shaped weights from A (r, d_in) and B (d_out, r) matrices."""
        return a_matrix, b_matrix

    def factor_matrices(self, a_weight: torch.Tensor, b_weight: torch.Tensor):
        """Inverse of :meth:`factor_weights`: A (r, d_in) and B (d_out, r)."""
        return a_weight, b_weight

    def delta_from_matrix(self, delta: torch.Tensor) -> torch.Tensor:
        """A (d_out, d_in) delta reshaped like the base weight."""
        return delta.T if self.fan_in_fan_out else delta


class ConvGeometry(LinearGeometry):
    """nn.Conv1d/2d/3d: A convolves like the base layer (kernel, stride, padding, dilation); B is pointwise."""

    fan_in_fan_out = False
    is_conv = True

    def __init__(self, base: nn.Module) -> None:
        self.conv = base
        self.kernel_size = tuple(base.kernel_size)
        self.weight_shape = full_shape(base.weight)
        self.mode_sizes = self.weight_shape  # (c_out, c_in / groups, k_1, ...)

    def factor_shapes(self, r):
        ones = (1,) * len(self.kernel_size)
        return (r, self.conv.in_channels, *self.kernel_size), (self.conv.out_channels, r) + ones

    def low_rank(self, x, a, b, scale=None):
        hidden = self.conv._conv_forward(x, a, None)
        if scale is not None:
            hidden = hidden * scale.reshape(-1, *([1] * len(self.kernel_size)))
        return _POINTWISE_CONV[len(self.kernel_size)](hidden, b)

    def convolve(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        """``x`` convolved with ``kernel`` as the base layer convolves (stride, padding, dilation, groups)."""
        return self.conv._conv_forward(x, kernel, None)

    def factor_weights(self, a_matrix, b_matrix):
        a_shape, b_shape = self.factor_shapes(a_matrix.shape[0])
        return a_matrix.reshape(a_shape), b_matrix.reshape(b_shape)

    def factor_matrices(self, a_weight, b_weight):
        return a_weight.flatten(1), b_weight.flatten(1)

    def delta_from_matrix(self, delta):
        return delta.reshape(self.weight_shape)


class EmbeddingGeometry(LinearGeometry):
    """nn.Embedding: the factorised matrix is W^T (dim, num_embeddings), as in peft's LoRA; A is a lookup table."""

    supports_dropout = False  # token ids cannot be dropped out; peft's LoRA embedding has no dropout either
    fan_in_fan_out = False

    def __init__(self, base: nn.Embedding) -> None:
        self.embedding = base
        self.mode_sizes = (base.embedding_dim, base.num_embeddings)

    def factor_shapes(self, r):
        return (self.embedding.num_embeddings, r), (self.embedding.embedding_dim, r)

    def low_rank(self, x, a, b, scale=None):
        hidden = F.embedding(x, a, padding_idx=self.embedding.padding_idx)
        return F.linear(hidden if scale is None else hidden * scale, b)

    def project_input(self, x, a_in):
        base = self.embedding
        return F.embedding(
            x, a_in, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )

    def factor_weights(self, a_matrix, b_matrix):
        return a_matrix.T, b_matrix

    def factor_matrices(self, a_weight, b_weight):
        return a_weight.T, b_weight

    def delta_from_matrix(self, delta):
        return delta.T


def geometry_for(base: nn.Module) -> LinearGeometry:
    """The geometry of ``base``, the innermost base layer an adapter wraps."""
    if isinstance(base, CONV_TYPES):
        return ConvGeometry(base)
    if isinstance(base, nn.Embedding):
        return EmbeddingGeometry(base)
    return LinearGeometry(base)
