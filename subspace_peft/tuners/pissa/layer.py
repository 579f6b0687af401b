"""PiSSA layers: ``y = base(x) + s * (B A dropout(x) - B_0 A_0 x)``.

``A, B`` train; ``A_0, B_0`` are frozen copies of their initial values, so ``W - s B_0 A_0`` is PiSSA's residual
``W_res`` (Meng et al., eq. 3) without ever writing it into the base weight. With QPiSSA the base layer already
holds the quantised residual, and the ``- B_0 A_0`` term is dropped (``residual_in_base``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..base import FactorLayer, LayerPlan
from .bnb import quantize_residual


class PiSSALayer(FactorLayer):
    """PiSSA on nn.Linear, transformers' Conv1D, nn.Conv1d/2d/3d, nn.Embedding and a bitsandbytes residual
    (QPiSSA)."""

    adapter_layer_names = ("pissa_A", "pissa_B")
    other_param_names = ("pissa_A0", "pissa_B0", "r", "scaling", "pissa_dropout", "residual_in_base")

    def _init_adapter_containers(self) -> None:
        self.scaling: dict[str, float] = {}
        self.residual_in_base: dict[str, bool] = {}
        self.pissa_dropout = nn.ModuleDict({})
        self.pissa_A = nn.ModuleDict({})
        self.pissa_B = nn.ModuleDict({})
        # frozen copies of the initial factors, as modules shaped like pissa_A / pissa_B
        self.pissa_A0 = nn.ModuleDict({})
        self.pissa_B0 = nn.ModuleDict({})

    def update_layer(self, adapter_name: str, plan: LayerPlan) -> None:
        """Add adapter ``adapter_name`` at rank ``plan.r`` and scale ``plan.scale`` from the initial (A, B) matrices
        ``plan.factors`` (None: empty, for a saved adapter's checkpoint). For QPiSSA, ``quantize_residual_into_base``
        follows."""
        r = self.r[adapter_name] = plan.r
        self.scaling[adapter_name] = plan.scale
        self.residual_in_base[adapter_name] = False
        use_dropout = plan.dropout > 0 and self.supports_dropout
        self.pissa_dropout[adapter_name] = nn.Dropout(plan.dropout) if use_dropout else nn.Identity()
        self.pissa_A[adapter_name], self.pissa_B[adapter_name] = self._new_factors(r, plan.factors, trainable=True)
        self.pissa_A0[adapter_name], self.pissa_B0[adapter_name] = self._new_factors(r, plan.factors, trainable=False)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _matrices(self, adapter: str, initial: bool):
        a, b = (self.pissa_A0, self.pissa_B0) if initial else (self.pissa_A, self.pissa_B)
        return self.geometry.factor_matrices(a[adapter].weight.float(), b[adapter].weight.float())

    def get_delta_weight(self, adapter: str, initial: bool = False) -> torch.Tensor:
        """``s (B A - B_0 A_0)`` (or ``s B A`` when the base holds the residual) shaped like the base weight, in fp32.

        With ``initial=True``: ``s B_0 A_0``, the principal part that PiSSA moves out of the base weight.
        """
        s = self.scaling[adapter]
        a0, b0 = self._matrices(adapter, initial=True)
        if initial:
            return self.geometry.delta_from_matrix(s * (b0 @ a0))
        a, b = self._matrices(adapter, initial=False)
        delta = b @ a
        if not self.residual_in_base[adapter]:
            delta = delta - b0 @ a0
        return self.geometry.delta_from_matrix(s * delta)

    def quantize_residual_into_base(self, adapter: str, kind: str, storage: Optional[str] = None) -> None:
        """QPiSSA (Meng et al., section 4.3): replace the full-precision base layer by bitsandbytes' quantised
        residual ``Q(W - s B_0 A_0)``, computed from this layer's own initial factors (so init and reload agree)."""
        base = self.get_base_layer()
        residual = base.weight.float() - self.get_delta_weight(adapter, initial=True)
        self.base_layer = quantize_residual(base, residual, kind, storage)
        self.residual_in_base[adapter] = True

    def residual_weight(self, adapter: str) -> torch.Tensor:
        """PiSSA's frozen residual ``W - s B_0 A_0`` shaped like the base weight, in fp32 (for inspection)."""
        if self.residual_in_base[adapter]:
            raise ValueError(f"adapter '{adapter}' is QPiSSA: its residual is the quantised base weight itself")
        return self.get_base_layer().weight.float() - self.get_delta_weight(adapter, initial=True)

    def lora_factors(self, adapter: str):
        """PiSSA's update s (B A - B_0 A_0) has rank <= 2r and is exactly the LoRA ([A; A_0], [B, -B_0]) at scale s.
        A QPiSSA layer's update is s B A (rank r) on the residual base."""
        a, b = self._matrices(adapter, initial=False)
        if not self.residual_in_base[adapter]:
            a0, b0 = self._matrices(adapter, initial=True)
            a, b = torch.cat([a, a0]), torch.cat([b, -b0], dim=1)
        return a, b, self.scaling[adapter]

    def _adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a = self.pissa_A[name].weight
        b = self.pissa_B[name].weight
        if x.is_floating_point():
            x = self._cast_input_dtype(x, a.dtype)
        out = self.geometry.low_rank(self.pissa_dropout[name](x), a, b)
        if not self.residual_in_base[name]:
            a0, b0 = self.pissa_A0[name].weight.to(a.dtype), self.pissa_B0[name].weight.to(a.dtype)
            out = out - self.geometry.low_rank(x, a0, b0)
        return out * self.scaling[name]

    def _base_is_the_original(self) -> bool:
        return not any(self.residual_in_base.values())

    def _disabled_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        # A QPiSSA base holds only the residual: add the frozen principal part back for the base model's output.
        for name in self.pissa_A0.keys():
            if self.residual_in_base[name]:
                a0, b0 = self.pissa_A0[name].weight, self.pissa_B0[name].weight
                principal = self.geometry.low_rank(x.to(a0.dtype), a0, b0) * self.scaling[name]
                result = result + principal.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "pissa." + super().__repr__()
