"""SVFit layers: ``y = base(x) + U_r diag(sigma_0 * delta) V_r^T x``, i.e. singular values ``sigma = sigma_0 (1 +
delta)``; only the relative change ``delta`` (zero at init) trains.

Training the relative change rather than ``sigma`` itself makes Adam change each singular value by about
``lr * sigma_i`` per step: the update's size follows the weight's scale, as LoRA's does, so one learning-rate grid
serves both (trained directly, ``sigma`` moves by ``lr`` whatever its size: SVFit wanted rates 10-30x LoRA's).
"""

from __future__ import annotations

import torch
from torch import nn

from ..base import FactorLayer, LayerPlan


class SVFitLayer(FactorLayer):
    """SVFit on nn.Linear, transformers' Conv1D, nn.Conv1d/2d/3d (the weight reshaped to (c_out, c_in *
    prod(kernel))) and nn.Embedding."""

    adapter_layer_names = ("svfit_delta",)
    other_param_names = ("svfit_sigma0", "svfit_Vh", "svfit_U", "r")

    def _init_adapter_containers(self) -> None:
        self.svfit_delta = nn.ModuleDict({})  # trainable relative change of the singular values, zero at init
        self.svfit_sigma0 = nn.ModuleDict({})  # frozen initial singular values
        self.svfit_Vh = nn.ModuleDict({})  # frozen V_r^T, shaped like an A factor
        self.svfit_U = nn.ModuleDict({})  # frozen U_r, shaped like a B factor

    def update_layer(self, adapter_name: str, plan: LayerPlan) -> None:
        """``plan.factors`` = (V_r^T, U_r, sigma_r), or None: empty, for a saved adapter's checkpoint."""
        r, factors = plan.r, plan.factors
        self.r[adapter_name] = r
        vectors = None if factors is None else factors[:2]
        self.svfit_Vh[adapter_name], self.svfit_U[adapter_name] = self._new_factors(r, vectors, trainable=False)
        values = None if factors is None else factors[2]
        self.svfit_delta[adapter_name], self.svfit_sigma0[adapter_name] = self._new_singular_values(r, values)
        if values is not None:
            with torch.no_grad():
                self.svfit_delta[adapter_name].weight.zero_()
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _sigma_change(self, adapter: str) -> torch.Tensor:
        """``sigma - sigma_0 = sigma_0 * delta``."""
        delta = self.svfit_delta[adapter].weight
        return self.svfit_sigma0[adapter].weight.to(delta.dtype) * delta

    def _matrices(self, adapter: str):
        vh, u = self.svfit_Vh[adapter].weight.float(), self.svfit_U[adapter].weight.float()
        return self.geometry.factor_matrices(vh, u)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``U_r diag(sigma_0 * delta) V_r^T`` shaped like the base weight, in fp32."""
        vh, u = self._matrices(adapter)
        return self.geometry.delta_from_matrix(u @ (self._sigma_change(adapter).float()[:, None] * vh))

    def lora_factors(self, adapter: str):
        """The update is exactly the rank-r LoRA (diag(sigma_0 * delta) V_r^T, U_r) at scale 1."""
        vh, u = self._matrices(adapter)
        return self._sigma_change(adapter).float()[:, None] * vh, u, 1.0

    def _adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        change = self._sigma_change(name)
        vh, u = self.svfit_Vh[name].weight.to(change.dtype), self.svfit_U[name].weight.to(change.dtype)
        if x.is_floating_point():
            x = self._cast_input_dtype(x, change.dtype)
        return self.geometry.low_rank(x, vh, u, scale=change)

    def __repr__(self) -> str:
        return "svfit." + super().__repr__()
