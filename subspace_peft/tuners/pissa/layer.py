"""PiSSA layers: ``y = base(x) + s * (B A dropout(x) - B_0 A_0 x)``.

``A, B`` train; ``A_0, B_0`` are frozen copies of their initial values, so ``W - s B_0 A_0`` is PiSSA's residual
``W_res`` (Meng et al., eq. 3) without ever writing it into the base weight. With QPiSSA the base layer already
holds the quantised residual, and the ``- B_0 A_0`` term is dropped (``residual_in_base``).
"""

from __future__ import annotations

import warnings
from abc import abstractmethod
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..targets import CONV_TYPES, weight_matrix

_POINTWISE_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class PiSSALayer(BaseTunerLayer):
    supports_dropout = True
    adapter_layer_names = ("pissa_A", "pissa_B")
    other_param_names = ("pissa_A0", "pissa_B0", "r", "lora_alpha", "scaling", "pissa_dropout", "residual_in_base")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.residual_in_base: dict[str, bool] = {}
        self.pissa_dropout = nn.ModuleDict({})
        self.pissa_A = nn.ModuleDict({})
        self.pissa_B = nn.ModuleDict({})
        # frozen copies of the initial factors, as modules shaped like pissa_A / pissa_B
        self.pissa_A0 = nn.ModuleDict({})
        self.pissa_B0 = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs

    # -- per layer type: the two factor modules, how a factor pair acts on x, and the weight it adds ----------------
    @abstractmethod
    def _make_factors(self, r: int) -> tuple[nn.Module, nn.Module]:
        """The (A, B) modules of rank ``r`` for this layer type, on the meta device."""

    @abstractmethod
    def _low_rank(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``B A x`` for factor weights shaped like the modules' weights."""

    def _factor_weights(self, a_matrix: torch.Tensor, b_matrix: torch.Tensor):
        """Module-shaped weights from A (r, d_in) and B (d_out, r) matrices."""
        return a_matrix, b_matrix

    def _factor_matrices(self, a_weight: torch.Tensor, b_weight: torch.Tensor):
        """Inverse of ``_factor_weights``: A (r, d_in) and B (d_out, r)."""
        return a_weight, b_weight

    def _delta_from_matrix(self, delta: torch.Tensor) -> torch.Tensor:
        """A (d_out, d_in) delta reshaped like the base weight."""
        return delta

    # -- adapter life cycle -------------------------------------------------------------------------------------
    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        factors: Optional[tuple[torch.Tensor, torch.Tensor]],
        residual_in_base: bool = False,
    ) -> None:
        """Add adapter ``adapter_name``. ``factors`` are the initial (A, B) matrices, or None on the meta device
        (``low_cpu_mem_usage``), where a checkpoint fills the values in afterwards."""
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.residual_in_base[adapter_name] = residual_in_base
        use_dropout = lora_dropout > 0 and self.supports_dropout
        self.pissa_dropout[adapter_name] = nn.Dropout(lora_dropout) if use_dropout else nn.Identity()
        # Factor modules are built on the meta device (no random init to throw away) and then given their values.
        # With factors=None (low_cpu_mem_usage loading) they stay on meta until the checkpoint is assigned.
        modules = [*self._make_factors(r), *self._make_factors(r)]
        if factors is not None:
            a_weight, b_weight = self._factor_weights(*factors)
            device = self.get_base_layer().weight.device
            for module, value in zip(modules, (a_weight, b_weight) * 2):
                module.weight = nn.Parameter(value.to(device).clone(memory_format=torch.contiguous_format))
        modules[2].requires_grad_(False)
        modules[3].requires_grad_(False)
        self.pissa_A[adapter_name], self.pissa_B[adapter_name] = modules[0], modules[1]
        self.pissa_A0[adapter_name], self.pissa_B0[adapter_name] = modules[2], modules[3]
        if factors is not None:
            self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def get_delta_weight(self, adapter: str, initial: bool = False) -> torch.Tensor:
        """``s (B A - B_0 A_0)`` (or ``s B A`` when the base holds the residual) shaped like the base weight, in fp32.

        With ``initial=True``: ``s B_0 A_0``, the principal part that PiSSA moves out of the base weight.
        """
        s = self.scaling[adapter]
        a0, b0 = self._factor_matrices(self.pissa_A0[adapter].weight.float(), self.pissa_B0[adapter].weight.float())
        if initial:
            return self._delta_from_matrix(s * (b0 @ a0))
        a, b = self._factor_matrices(self.pissa_A[adapter].weight.float(), self.pissa_B[adapter].weight.float())
        delta = b @ a
        if not self.residual_in_base[adapter]:
            delta = delta - b0 @ a0
        return self._delta_from_matrix(s * delta)

    def residual_weight(self, adapter: str) -> torch.Tensor:
        """PiSSA's frozen residual ``W - s B_0 A_0`` shaped like the base weight, in fp32 (for inspection)."""
        if self.residual_in_base[adapter]:
            raise ValueError(f"adapter '{adapter}' is QPiSSA: its residual is the quantised base weight itself")
        return self.get_base_layer().weight.float() - self.get_delta_weight(adapter, initial=True)

    def _check_merge_possible(self) -> None:
        if not self.get_base_layer().weight.dtype.is_floating_point:
            raise ValueError(
                "cannot merge a PiSSA adapter into a quantised (QPiSSA) base weight without losing precision; "
                "use subspace_peft.export_lora() to get a plain LoRA adapter for the residual base instead"
            )

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        self._check_merge_possible()
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.pissa_A:
                continue
            delta = self.get_delta_weight(name).to(base.weight.dtype)
            if safe_merge:
                merged = base.weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs or Infs in adapter '{name}': merging it would break the model")
                base.weight.data = merged
            else:
                base.weight.data += delta
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.pissa_A:
                base.weight.data -= self.get_delta_weight(name).to(base.weight.dtype)

    # -- forward ------------------------------------------------------------------------------------------------
    def _adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a = self.pissa_A[name].weight
        b = self.pissa_B[name].weight
        if x.is_floating_point():
            x = self._cast_input_dtype(x, a.dtype)
        out = self._low_rank(self.pissa_dropout[name](x), a, b)
        if not self.residual_in_base[name]:
            out = out - self._low_rank(x, self.pissa_A0[name].weight.to(a.dtype), self.pissa_B0[name].weight.to(a.dtype))
        return out * self.scaling[name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            result = self.base_layer(x, *args, **kwargs)
            # A QPiSSA base holds only the residual: add the frozen principal part back for the base model's output.
            for name in self.pissa_A0.keys():
                if self.residual_in_base[name]:
                    a0, b0 = self.pissa_A0[name].weight, self.pissa_B0[name].weight
                    principal = self._low_rank(x.to(a0.dtype), a0, b0) * self.scaling[name]
                    result = result + principal.to(result.dtype)
            return result
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        torch_result_dtype = result.dtype
        for name in self.active_adapters:
            if name in self.pissa_A:
                result = result + self._adapter_output(x, name).to(torch_result_dtype)
        return result

    def __repr__(self) -> str:
        return "pissa." + super().__repr__()


class PiSSAModule(nn.Module, PiSSALayer):
    """An nn.Module wrapping ``base_layer`` with PiSSA adapters; subclasses define the layer-type hooks."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs) -> None:
        super().__init__()
        PiSSALayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    forward = PiSSALayer.forward


class Linear(PiSSAModule):
    """PiSSA on nn.Linear, on transformers' Conv1D (``fan_in_fan_out``) and on a bitsandbytes residual (QPiSSA)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, d_out: int, d_in: int, **kwargs) -> None:
        self.d_out, self.d_in = d_out, d_in
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        super().__init__(base_layer, adapter_name, **kwargs)

    def _make_factors(self, r):
        return nn.Linear(self.d_in, r, bias=False, device="meta"), nn.Linear(r, self.d_out, bias=False, device="meta")

    def _low_rank(self, x, a, b):
        return F.linear(F.linear(x, a), b)

    def _delta_from_matrix(self, delta):
        return delta.T if self.fan_in_fan_out else delta


class Conv(PiSSAModule):
    """PiSSA on nn.Conv1d/2d/3d: A is a conv with the base's kernel, stride, padding and dilation; B is 1x1."""

    def _make_factors(self, r):
        base = self.get_base_layer()
        conv_cls = type(base)
        ones = (1,) * len(base.kernel_size)
        a = conv_cls(
            base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
            bias=False, padding_mode=base.padding_mode, device="meta",
        )
        b = conv_cls(r, base.out_channels, ones, ones, bias=False, device="meta")
        return a, b

    def _low_rank(self, x, a, b):
        base = self.get_base_layer()
        # A convolves like the base layer (stride, padding, padding mode, dilation); B is a pointwise conv
        hidden = base._conv_forward(x, a, None)
        return _POINTWISE_CONV[len(base.kernel_size)](hidden, b)

    def _factor_weights(self, a_matrix, b_matrix):
        base = self.get_base_layer()
        r = a_matrix.shape[0]
        ones = (1,) * len(base.kernel_size)
        return a_matrix.reshape(r, base.in_channels, *base.kernel_size), b_matrix.reshape(base.out_channels, r, *ones)

    def _factor_matrices(self, a_weight, b_weight):
        return a_weight.flatten(1), b_weight.flatten(1)

    def _delta_from_matrix(self, delta):
        return delta.reshape(self.get_base_layer().weight.shape)


class Embedding(PiSSAModule):
    """PiSSA on nn.Embedding. The factorised matrix is W^T (dim, num_embeddings), as in peft's LoRA."""

    supports_dropout = False  # token ids cannot be dropped out; peft's LoRA embedding has no dropout either

    def _make_factors(self, r):
        base = self.get_base_layer()
        # A is stored as an (num_embeddings, r) lookup table, B as Linear(r, dim): both leaf modules with .weight
        return (
            nn.Embedding(base.num_embeddings, r, device="meta"),
            nn.Linear(r, base.embedding_dim, bias=False, device="meta"),
        )

    def _low_rank(self, x, a, b):
        return F.linear(F.embedding(x, a, padding_idx=self.get_base_layer().padding_idx), b)

    def _factor_weights(self, a_matrix, b_matrix):
        return a_matrix.T, b_matrix

    def _factor_matrices(self, a_weight, b_weight):
        return a_weight.T, b_weight

    def _delta_from_matrix(self, delta):
        return delta.T


def create_layer(target: nn.Module, adapter_name: str, **kwargs) -> nn.Module:
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, CONV_TYPES):
        return Conv(target, adapter_name, **kwargs)
    if isinstance(base, nn.Embedding):
        return Embedding(target, adapter_name, **kwargs)
    d_out, d_in = (base.out_features, base.in_features) if hasattr(base, "out_features") else weight_matrix(base).shape
    return Linear(target, adapter_name, d_out=d_out, d_in=d_in, **kwargs)
