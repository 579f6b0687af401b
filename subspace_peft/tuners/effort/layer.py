"""Effort layers: ``y = base(x) + U diag(s) Vh x - U_0 diag(s_0) Vh_0 x``; ``U, s, Vh`` train.

``U_0, s_0, Vh_0`` are the weight's r minor singular triplets, frozen, so ``W - U_0 diag(s_0) Vh_0`` is Effort's
frozen principal part ``U_k S_k V_k^T`` without ever writing it (or a copy of it) anywhere.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..base import FactorLayer, LayerPlan, weight_matrix
from .losses import LossInputs, group_losses, shorter_side_principal, thin_product, weight_square_norm
from .regulariser import RegulariserPass


class EffortLayer(FactorLayer):
    """Effort on nn.Linear, transformers' Conv1D, nn.Conv1d/2d/3d (the weight reshaped to (c_out, c_in *
    prod(kernel))) and nn.Embedding (the factorised matrix is W^T)."""

    adapter_layer_names = ("effort_U", "effort_S", "effort_Vh")
    other_param_names = ("effort_U0", "effort_S0", "effort_Vh0", "effort_derived", "r")

    def _init_adapter_containers(self) -> None:
        self.effort_U = nn.ModuleDict({})  # shaped like a B factor
        self.effort_S = nn.ModuleDict({})
        self.effort_Vh = nn.ModuleDict({})  # shaped like an A factor
        self.effort_U0 = nn.ModuleDict({})  # frozen initial values
        self.effort_S0 = nn.ModuleDict({})
        self.effort_Vh0 = nn.ModuleDict({})
        # Derived from W and the initial factors when the losses first need them, never saved (reload stays
        # SVD-free; the loss is invariant to the principal vectors' sign/rotation): (stamp, principal, initial thin,
        # ||W||_F^2), the principal vectors of the shorter side for non-square W only.
        self.effort_derived: dict[str, tuple] = {}
        # set by EffortModel for each training forward pass: this layer ties its regulariser terms to the gradient
        self.regulariser_pass: Optional[RegulariserPass] = None

    def update_layer(self, adapter_name: str, plan: LayerPlan) -> None:
        """``plan.factors`` = (Vh_0, U_0, s_0), the minor triplets, or None: empty, for a saved adapter's
        checkpoint."""
        r, factors = plan.r, plan.factors
        self.r[adapter_name] = r
        self.effort_derived.pop(adapter_name, None)
        vectors = None if factors is None else factors[:2]
        self.effort_Vh[adapter_name], self.effort_U[adapter_name] = self._new_factors(r, vectors, trainable=True)
        self.effort_Vh0[adapter_name], self.effort_U0[adapter_name] = self._new_factors(r, vectors, trainable=False)
        values = None if factors is None else factors[2]
        self.effort_S[adapter_name], self.effort_S0[adapter_name] = self._new_singular_values(r, values)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _triplet(self, adapter: str, initial: bool = False):
        """(U (d_out, r), s (r,), Vh (r, d_in)) in fp32."""
        u, s, vh = (
            (self.effort_U0, self.effort_S0, self.effort_Vh0)
            if initial
            else (self.effort_U, self.effort_S, self.effort_Vh)
        )
        vh_matrix, u_matrix = self.geometry.factor_matrices(vh[adapter].weight.float(), u[adapter].weight.float())
        return u_matrix, s[adapter].weight.float(), vh_matrix

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``U diag(s) Vh - U_0 diag(s_0) Vh_0`` shaped like the base weight, in fp32."""
        u, s, vh = self._triplet(adapter)
        u0, s0, vh0 = self._triplet(adapter, initial=True)
        return self.geometry.delta_from_matrix(u @ (s[:, None] * vh) - u0 @ (s0[:, None] * vh0))

    def lora_factors(self, adapter: str):
        """The update is exactly the rank-2r LoRA ([diag(s) Vh; diag(s_0) Vh_0], [U, -U_0]) at scale 1."""
        u, s, vh = self._triplet(adapter)
        u0, s0, vh0 = self._triplet(adapter, initial=True)
        return torch.cat([s[:, None] * vh, s0[:, None] * vh0]), torch.cat([u, -u0], dim=1), 1.0

    def _adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        s, s0 = self.effort_S[name].weight, self.effort_S0[name].weight
        if self.regulariser_pass is not None:
            s = self.regulariser_pass.tie(self, name, s)
        dtype = s.dtype
        if x.is_floating_point():
            x = self._cast_input_dtype(x, dtype)
        vh, u = self.effort_Vh[name].weight.to(dtype), self.effort_U[name].weight.to(dtype)
        vh0, u0 = self.effort_Vh0[name].weight.to(dtype), self.effort_U0[name].weight.to(dtype)
        current = self.geometry.low_rank(x, vh, u, s)
        initial = self.geometry.low_rank(x, vh0, u0, s0)
        return current - initial

    # -- Effort's regularisers --------------------------------------------------------------------------------------
    def _derived(self, adapter: str, weight: torch.Tensor, initial) -> tuple:
        # restamped when W or the initial factors are replaced or edited in place (e.g. a checkpoint loaded)
        tensors = (weight, self.effort_U0[adapter].weight, self.effort_Vh0[adapter].weight)
        stamp = tuple((t.data_ptr(), t._version) for t in tensors)
        cached = self.effort_derived.get(adapter)
        if cached is None or cached[0] != stamp:
            square = weight.shape[0] == weight.shape[1]
            principal = None if square else shorter_side_principal(weight, self.r[adapter])
            with torch.no_grad():
                cached = (stamp, principal, thin_product(weight, initial[0], initial[2]), weight_square_norm(weight))
            self.effort_derived[adapter] = cached
        return cached[1:]

    def loss_inputs(self, adapter: str) -> LossInputs:
        """What Effort's losses need from this layer for ``adapter``."""
        if self.merged:
            raise ValueError("Effort's losses are defined on the unmerged model: call unmerge_adapter() first")
        weight = weight_matrix(self.get_base_layer()).detach()
        initial = self._triplet(adapter, initial=True)
        principal, initial_thin, square_norm = self._derived(adapter, weight, initial)
        return LossInputs(weight, self._triplet(adapter), initial, principal, initial_thin, square_norm)

    def subspace_losses(self, adapter: str) -> dict[str, torch.Tensor]:
        """This layer's unweighted ``{"orth": ..., "norm": ...}`` for ``adapter`` (see EffortConfig)."""
        return group_losses([self.loss_inputs(adapter)])

    def __repr__(self) -> str:
        return "effort." + super().__repr__()
