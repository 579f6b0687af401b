"""SVFit layers: ``y = base(x) + U_r diag(sigma - sigma_0) V_r^T x``; only ``sigma`` trains."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..factor_layers import ConvFactors, EmbeddingFactors, FactorLayer, FactorModule, LinearFactors
from ..factor_layers import create_layer as create_factor_layer
from ..leaf import TensorLeaf


class SingularValues(TensorLeaf):
    """r singular values as a leaf module with a ``.weight`` (so FSDP1 with use_orig_params=False can wrap it)."""

    def __init__(self, r: int, device=None, trainable: bool = True) -> None:
        super().__init__((r,), device, trainable)

    def extra_repr(self) -> str:
        return f"r={self.weight.shape[0]}"


class SVFitLayer(FactorLayer):
    adapter_layer_names = ("svfit_sigma",)
    other_param_names = ("svfit_sigma0", "svfit_Vh", "svfit_U", "r")

    def _init_layer(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.svfit_sigma = nn.ModuleDict({})
        self.svfit_sigma0 = nn.ModuleDict({})  # frozen initial singular values
        self.svfit_Vh = nn.ModuleDict({})  # frozen V_r^T, shaped like an A factor
        self.svfit_U = nn.ModuleDict({})  # frozen U_r, shaped like a B factor
        self._disable_adapters = False
        self.merged_adapters = []

    def update_layer(self, adapter_name: str, r: int, factors: Optional[tuple]) -> None:
        """``factors`` = (V_r^T, U_r, sigma_r), or None: empty, for a saved adapter's checkpoint."""
        self.r[adapter_name] = r
        vectors = None if factors is None else factors[:2]
        self.svfit_Vh[adapter_name], self.svfit_U[adapter_name] = self._new_factors(r, vectors, trainable=False)
        device = self.get_base_layer().weight.device
        sigma, sigma0 = SingularValues(r, device), SingularValues(r, device, trainable=False)
        if factors is not None:
            with torch.no_grad():
                sigma.weight.copy_(factors[2])
                sigma0.weight.copy_(factors[2])
        self.svfit_sigma[adapter_name], self.svfit_sigma0[adapter_name] = sigma, sigma0
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _sigma_change(self, adapter: str) -> torch.Tensor:
        sigma = self.svfit_sigma[adapter].weight
        return sigma - self.svfit_sigma0[adapter].weight.to(sigma.dtype)

    def _matrices(self, adapter: str):
        return self._factor_matrices(self.svfit_Vh[adapter].weight.float(), self.svfit_U[adapter].weight.float())

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``U_r diag(sigma - sigma_0) V_r^T`` shaped like the base weight, in fp32."""
        vh, u = self._matrices(adapter)
        return self._delta_from_matrix(u @ (self._sigma_change(adapter).float()[:, None] * vh))

    def lora_factors(self, adapter: str):
        """The update is exactly the rank-r LoRA (diag(sigma - sigma_0) V_r^T, U_r) at scale 1."""
        vh, u = self._matrices(adapter)
        return self._sigma_change(adapter).float()[:, None] * vh, u, 1.0

    def _adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        change = self._sigma_change(name)
        vh, u = self.svfit_Vh[name].weight.to(change.dtype), self.svfit_U[name].weight.to(change.dtype)
        if x.is_floating_point():
            x = self._cast_input_dtype(x, change.dtype)
        return self._low_rank(x, vh, u, scale=change)

    def __repr__(self) -> str:
        return "svfit." + super().__repr__()


class Linear(LinearFactors, FactorModule, SVFitLayer):
    """SVFit on nn.Linear and transformers' Conv1D."""


class Conv(ConvFactors, FactorModule, SVFitLayer):
    """SVFit on nn.Conv1d/2d/3d (the weight reshaped to (c_out, c_in * prod(kernel)))."""


class Embedding(EmbeddingFactors, FactorModule, SVFitLayer):
    """SVFit on nn.Embedding."""


LAYER_CLASSES = {LinearFactors: Linear, ConvFactors: Conv, EmbeddingFactors: Embedding}


def create_layer(target: nn.Module, adapter_name: str, **kwargs) -> nn.Module:
    return create_factor_layer(LAYER_CLASSES, target, adapter_name, **kwargs)
