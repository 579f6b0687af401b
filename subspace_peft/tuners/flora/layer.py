"""FLoRA layers: ``y = base(x) + scale * (G x_1 A_1 ... x_N A_N) applied to dropout(x)``; ``G`` and every ``A_m`` train.

Modes are kept in the weight's own order (``geometry.mode_sizes``): (out, in) for 2-D weights (for Embedding the
factorised matrix is W^T, as in peft's LoRA: out = embedding_dim, in = num_embeddings) and (c_out, c_in / groups,
k_1, ...) for convolutions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...linalg.tucker import tucker_to_tensor
from ..base import FactorLayer, LayerPlan, TensorLeaf

MAX_MODES = 5  # Conv3d: (c_out, c_in / groups, k_d, k_h, k_w)
# One ModuleDict per mode, as peft's keys expect (<layer>.<name>.<adapter>.weight): factor A_m is flora_A{m}
FACTOR_NAMES = tuple(f"flora_A{mode}" for mode in range(MAX_MODES))


class FLoRALayer(FactorLayer):
    """FLoRA on nn.Linear, transformers' Conv1D and nn.Embedding (two modes: ``scale * A_out G A_in^T``, applied as
    three thin products, never d_out x d_in) and on nn.Conv1d/2d/3d, grouped and depthwise included (the update is a
    kernel of the base's shape, applied with the base layer's stride, padding, dilation, groups and padding mode)."""

    adapter_layer_names = ("flora_core",) + FACTOR_NAMES
    other_param_names = ("r", "scaling", "flora_dropout")

    def _init_adapter_containers(self) -> None:
        self.scaling: dict[str, float] = {}
        self.flora_dropout = nn.ModuleDict({})
        self.flora_core = nn.ModuleDict({})
        for name in FACTOR_NAMES:  # flora_A{m}[adapter].weight: the (size_m, r_m) factor of mode m
            setattr(self, name, nn.ModuleDict({}))

    def update_layer(self, adapter_name: str, plan: LayerPlan) -> None:
        """Add ``adapter_name`` with per-mode ranks ``plan.r`` (weight order) from ``plan.factors`` = (core,
        [A_1, ..., A_N]), or None: empty tensors for a checkpoint to fill in (on the meta device under
        ``low_cpu_mem_usage``)."""
        self.r[adapter_name] = tuple(plan.r)
        self.scaling[adapter_name] = plan.scale
        use_dropout = plan.dropout > 0 and self.supports_dropout
        self.flora_dropout[adapter_name] = nn.Dropout(plan.dropout) if use_dropout else nn.Identity()
        device = self.get_base_layer().weight.device
        if plan.factors is None:
            core = TensorLeaf(tuple(plan.r), device)
            factors = [TensorLeaf((size, rank), device) for size, rank in zip(self.geometry.mode_sizes, plan.r)]
        else:
            core = TensorLeaf(plan.factors[0].to(device))
            factors = [TensorLeaf(factor.to(device)) for factor in plan.factors[1]]
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
        return self.geometry.delta_from_matrix(self._tucker(adapter, torch.float32))

    def _input(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        x = self.flora_dropout[adapter](x)
        return self._cast_input_dtype(x, self.flora_core[adapter].weight.dtype) if x.is_floating_point() else x

    def _adapter_output(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        x = self._input(x, adapter)
        if self.geometry.is_conv:
            return self.geometry.convolve(x, self._tucker(adapter, x.dtype))
        core = self.flora_core[adapter].weight
        a_out, a_in = (factor.to(core.dtype) for factor in self._factors(adapter))
        hidden = F.linear(self.geometry.project_input(x, a_in), core)
        return F.linear(hidden, a_out) * self.scaling[adapter]

    def lora_factors(self, adapter: str):
        """Two modes: exact at rank min(r_out, r_in), (G A_in^T, A_out) or (A_in^T, A_out G). Convolutions: exact at
        rank r_out, B = A_out, A = G x_in A_in x_k A_k ... reshaped to (r_out, c_in * prod(kernel))."""
        factors = [factor.float() for factor in self._factors(adapter)]
        core = self.flora_core[adapter].weight.float()
        if self.geometry.is_conv:
            groups = self.get_base_layer().groups
            if groups != 1:
                raise ValueError(
                    f"export_lora cannot write FLoRA on a grouped convolution (groups={groups}): peft's LoRA conv "
                    "has no block-diagonal form. Merge the adapter instead (merge_and_unload)."
                )
            return tucker_to_tensor(core, [None] + factors[1:]).flatten(1), factors[0], self.scaling[adapter]
        a_out, a_in = factors
        if core.shape[0] <= core.shape[1]:
            return core @ a_in.T, a_out, self.scaling[adapter]
        return a_in.T, a_out @ core, self.scaling[adapter]

    def __repr__(self) -> str:
        return "flora." + super().__repr__()
