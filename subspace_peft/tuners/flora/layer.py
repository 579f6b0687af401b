"""FLoRA layers: ``y = base(x) + scale * (G x_1 A_1 ... x_N A_N) applied to dropout(x)``; ``G`` and every ``A_m`` train.

Modes are kept in the weight's own order: (out, in) for 2-D weights (for Embedding the factorised matrix is W^T, as
in peft's LoRA: out = embedding_dim, in = num_embeddings) and (c_out, c_in / groups, k_1, ...) for convolutions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...linalg.tucker import tucker_to_tensor
from ..factor_layers import ConvFactors, EmbeddingFactors, FactorLayer, FactorModule, LinearFactors
from ..factor_layers import create_layer as create_factor_layer
from ..leaf import TensorLeaf
from ..targets import CONV_TYPES, weight_matrix


def mode_sizes(base: nn.Module) -> tuple[int, ...]:
    """Sizes of the modes FLoRA factorises, in weight order (see the module docstring)."""
    if isinstance(base, CONV_TYPES):
        return tuple(base.weight.shape)
    return tuple(weight_matrix(base).shape)


MAX_MODES = 5  # Conv3d: (c_out, c_in / groups, k_d, k_h, k_w)
# One ModuleDict per mode, as peft's keys expect (<layer>.<name>.<adapter>.weight): factor A_m is flora_A{m}
FACTOR_NAMES = tuple(f"flora_A{mode}" for mode in range(MAX_MODES))


class FLoRALayer(FactorLayer):
    adapter_layer_names = ("flora_core",) + FACTOR_NAMES
    other_param_names = ("r", "scaling", "flora_dropout")

    def _init_layer(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.r: dict[str, tuple[int, ...]] = {}  # per-mode ranks, weight order
        self.scaling: dict[str, float] = {}
        self.flora_dropout = nn.ModuleDict({})
        self.flora_core = nn.ModuleDict({})
        for name in FACTOR_NAMES:  # flora_A{m}[adapter].weight: the (size_m, r_m) factor of mode m
            setattr(self, name, nn.ModuleDict({}))
        self._disable_adapters = False
        self.merged_adapters = []

    def update_layer(
        self, adapter_name: str, ranks: tuple[int, ...], scale: float, dropout: float, init_weights: bool = True
    ) -> None:
        """Add ``adapter_name`` with per-mode ``ranks`` (weight order). ``init_weights=False`` leaves the tensors
        empty for a checkpoint to fill in (on the meta device under ``low_cpu_mem_usage``)."""
        sizes = mode_sizes(self.get_base_layer())
        device = self.get_base_layer().weight.device
        self.r[adapter_name] = tuple(ranks)
        self.scaling[adapter_name] = scale
        use_dropout = dropout > 0 and self.supports_dropout
        self.flora_dropout[adapter_name] = nn.Dropout(dropout) if use_dropout else nn.Identity()
        core = TensorLeaf(tuple(ranks), device)
        factors = [TensorLeaf((size, rank), device) for size, rank in zip(sizes, ranks)]
        if init_weights:
            with torch.no_grad():
                core.weight.zero_()
                for factor in factors:
                    nn.init.kaiming_uniform_(factor.weight, a=math.sqrt(5))
        self.flora_core[adapter_name] = core
        for name, factor in zip(FACTOR_NAMES, factors):
            getattr(self, name)[adapter_name] = factor
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _factors(self, adapter: str) -> list[torch.Tensor]:
        """The factor matrices A_m (size_m, r_m), in weight-mode order."""
        return [getattr(self, name)[adapter].weight for name in FACTOR_NAMES[: len(self.r[adapter])]]

    def _tucker(self, adapter: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``scale * G x_1 A_1 ... x_N A_N`` in weight-mode order (2-D weights: the (d_out, d_in) matrix)."""
        core = self.flora_core[adapter].weight
        dtype = dtype or core.dtype
        factors = [factor.to(dtype) for factor in self._factors(adapter)]
        return tucker_to_tensor(core.to(dtype), factors) * self.scaling[adapter]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The update shaped like the base weight, in fp32."""
        return self._delta_from_matrix(self._tucker(adapter, torch.float32))

    def _input(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        x = self.flora_dropout[adapter](x)
        return self._cast_input_dtype(x, self.flora_core[adapter].weight.dtype) if x.is_floating_point() else x

    def __repr__(self) -> str:
        return "flora." + super().__repr__()


class TwoModeFLoRA(FLoRALayer):
    """Linear, Conv1D and Embedding: ``scale * A_out G A_in^T``, applied as three thin products (never d_out x d_in)."""

    def _embed_input(self, x: torch.Tensor, a_in: torch.Tensor) -> torch.Tensor:
        return x @ a_in

    def _adapter_output(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        core = self.flora_core[adapter].weight
        a_out, a_in = (factor.to(core.dtype) for factor in self._factors(adapter))
        hidden = F.linear(self._embed_input(self._input(x, adapter), a_in), core)
        return F.linear(hidden, a_out) * self.scaling[adapter]

    def lora_factors(self, adapter: str):
        """Exact at rank min(r_out, r_in): (G A_in^T, A_out) or (A_in^T, A_out G)."""
        core = self.flora_core[adapter].weight.float()
        a_out, a_in = (factor.float() for factor in self._factors(adapter))
        if core.shape[0] <= core.shape[1]:
            return core @ a_in.T, a_out, self.scaling[adapter]
        return a_in.T, a_out @ core, self.scaling[adapter]


class Linear(LinearFactors, FactorModule, TwoModeFLoRA):
    """FLoRA on nn.Linear and transformers' Conv1D."""


class Embedding(EmbeddingFactors, FactorModule, TwoModeFLoRA):
    """FLoRA on nn.Embedding (A_in is a (num_embeddings, r_in) lookup table)."""

    def _embed_input(self, x: torch.Tensor, a_in: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        return F.embedding(x, a_in, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                           base.sparse)


class Conv(ConvFactors, FactorModule, FLoRALayer):
    """FLoRA on nn.Conv1d/2d/3d, grouped and depthwise included: the update is a kernel of the base's shape, applied
    with the base layer's stride, padding, dilation, groups and padding mode."""

    def _adapter_output(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        x = self._input(x, adapter)
        return self.get_base_layer()._conv_forward(x, self._tucker(adapter, x.dtype), None)

    def lora_factors(self, adapter: str):
        """Exact at rank r_out: B = A_out, A = G x_in A_in x_k A_k ... reshaped to (r_out, c_in * prod(kernel))."""
        base = self.get_base_layer()
        if base.groups != 1:
            raise ValueError(
                f"export_lora cannot write FLoRA on a grouped convolution (groups={base.groups}): peft's LoRA conv "
                "has no block-diagonal form. Merge the adapter instead (merge_and_unload)."
            )
        factors = [factor.float() for factor in self._factors(adapter)]
        a = tucker_to_tensor(self.flora_core[adapter].weight.float(), [None] + factors[1:])
        return a.flatten(1), factors[0], self.scaling[adapter]


LAYER_CLASSES = {LinearFactors: Linear, ConvFactors: Conv, EmbeddingFactors: Embedding}


def create_layer(target: nn.Module, adapter_name: str, **kwargs) -> nn.Module:
    return create_factor_layer(LAYER_CLASSES, target, adapter_name, **kwargs)
