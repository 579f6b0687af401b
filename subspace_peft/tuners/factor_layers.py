"""What every SVD-factor tuner layer shares: the geometry of A/B factor pairs per layer type, merging, forward.

A method's update is a sum of rank-r products ``B A x`` with ``A`` (r, d_in) and ``B`` (d_out, r) matrices. How such
a pair is stored and applied depends on the layer type only (the geometry mixins below); what trains and how the
update is formed depends on the method (its ``FactorLayer`` subclass). The base weight itself is never rewritten.
"""

from __future__ import annotations

import warnings
from abc import abstractmethod
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .leaf import TensorLeaf
from .targets import CONV_TYPES, weight_matrix

_POINTWISE_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class FactorLayer(BaseTunerLayer):
    """Merging, unmerging and the forward pass of a tuner whose update is ``get_delta_weight`` / ``_adapter_output``."""

    supports_dropout = True

    # -- per layer type (geometry mixins) ---------------------------------------------------------------------------
    @abstractmethod
    def _factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of the (A, B) weights of rank ``r`` for this layer type, as ``_low_rank`` takes them."""

    @abstractmethod
    def _low_rank(
        self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``B diag(scale) A x`` (``B A x`` without ``scale``) for factor weights shaped like the modules' weights."""

    def _factor_weights(self, a_matrix: torch.Tensor, b_matrix: torch.Tensor):
        """Module-shaped weights from A (r, d_in) and B (d_out, r) matrices."""
        return a_matrix, b_matrix

    def _factor_matrices(self, a_weight: torch.Tensor, b_weight: torch.Tensor):
        """Inverse of ``_factor_weights``: A (r, d_in) and B (d_out, r)."""
        return a_weight, b_weight

    def _delta_from_matrix(self, delta: torch.Tensor) -> torch.Tensor:
        """A (d_out, d_in) delta reshaped like the base weight."""
        return delta

    # -- per method -------------------------------------------------------------------------------------------------
    @abstractmethod
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The adapter's update, shaped like the base weight, in fp32."""

    @abstractmethod
    def _adapter_output(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """The adapter's update applied to ``x``."""

    @abstractmethod
    def lora_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, scale) matrices with ``scale * B @ A`` equal to the update, for ``export_lora``."""

    def _disabled_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.base_layer(x, *args, **kwargs)

    # -- shared -----------------------------------------------------------------------------------------------------
    def _new_factors(self, r: int, factors: Optional[tuple], trainable: bool) -> tuple[nn.Module, nn.Module]:
        """(A, B) leaf modules holding the ``factors`` matrices (A (r, d_in), B (d_out, r)) on the base layer's
        device. ``factors=None`` (a saved adapter being loaded) gives empty tensors for the checkpoint to fill in (on
        the meta device under ``low_cpu_mem_usage``)."""
        device = self.get_base_layer().weight.device
        if factors is None:
            weights = [torch.empty(shape, device=device) for shape in self._factor_shapes(r)]
        else:
            weights = [value.to(device).clone(memory_format=torch.contiguous_format)
                       for value in self._factor_weights(*factors)]
        return tuple(TensorLeaf(weight, trainable=trainable) for weight in weights)

    def adapter_tensors(self, adapter: Optional[str] = None):
        """(key relative to this layer, adapter name, tensor) of every tensor an adapter keeps on this layer (what its
        checkpoint holds), for one adapter or all."""
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr, None)
            if not isinstance(container, nn.ModuleDict):
                continue
            for name, module in container.items():
                if adapter is None or name == adapter:
                    for key, tensor in module.state_dict(keep_vars=True).items():
                        yield f"{attr}.{name}.{key}", name, tensor

    def _check_loaded(self, adapter: str) -> None:
        if adapter in self.awaiting_checkpoint:
            raise ValueError(
                f"adapter '{adapter}' was built from a saved adapter's config and its weights have not been loaded: "
                "load the adapter with PeftModel.from_pretrained(base, path) or model.load_adapter(path, name); to "
                "start a new adapter with the same settings, build the config again (e.g. "
                "type(config)(**config.to_dict()))"
            )

    def _check_merge_possible(self) -> None:
        if not self.get_base_layer().weight.dtype.is_floating_point:
            raise ValueError(
                "cannot merge an adapter into a quantised base weight without losing precision; use "
                "subspace_peft.export_lora() to get a plain LoRA adapter for that base instead"
            )

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        self._check_merge_possible()
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.r:
                continue
            self._check_loaded(name)
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
            if name in self.r:
                base.weight.data -= self.get_delta_weight(name).to(base.weight.dtype)

    def _base_is_the_original(self) -> bool:
        """Whether ``base_layer`` computes the original model's layer (not e.g. QPiSSA's quantised residual)."""
        return True

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list, **kwargs: Any) -> torch.Tensor:
        """peft's mixed-adapter batch: row i runs adapter ``adapter_names[i]`` (``"__base__"``: the base model)."""
        if self.merged:
            raise ValueError("cannot pass adapter_names while adapters are merged: call unmerge_adapter() first")
        if len(adapter_names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {x.shape[0]} rows: "
                             "give one adapter name (or '__base__') per row")
        result = self.base_layer(x, *args, **kwargs)
        for name in dict.fromkeys(adapter_names):
            rows = torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=x.device)
            if name == "__base__" and not self._base_is_the_original():
                result[rows] = self._disabled_forward(x[rows], *args, **kwargs).to(result.dtype)
            elif name in self.r:
                self._check_loaded(name)
                result[rows] = result[rows] + self._adapter_output(x[rows], name).to(result.dtype)
        return result

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self._disabled_forward(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name in self.r:
                self._check_loaded(name)
                result = result + self._adapter_output(x, name).to(result.dtype)
        return result


class FactorModule(nn.Module):
    """The nn.Module side of a factor layer, constructed like peft's layers: wrap ``base_layer``, add one adapter.

    A method's concrete layers are ``class Linear(LinearFactors, FactorModule, MethodLayer)``: geometry first, then
    this, then the method's FactorLayer subclass, which sets up its adapter containers in ``_init_layer``.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs) -> None:
        super().__init__()
        self.awaiting_checkpoint: set[str] = set()  # adapters built empty, whose checkpoint has not been loaded yet
        self._init_layer(base_layer)
        # as on peft's LoRA layers (code that inspects adapted layers reads them): Linear/Conv1D in and out features,
        # ConvNd channels, Embedding (num_embeddings, embedding_dim)
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return FactorLayer.forward(self, x, *args, **kwargs)


# -- geometry of factor pairs per layer type ---------------------------------------------------------------------
class LinearFactors:
    """nn.Linear, transformers' Conv1D (stored (in, out): ``fan_in_fan_out``) and bitsandbytes Linear layers."""

    @property
    def fan_in_fan_out(self) -> bool:
        return isinstance(self.get_base_layer(), Conv1D)

    def _factor_shapes(self, r):
        base = self.get_base_layer()
        d_out, d_in = (base.out_features, base.in_features) if hasattr(base, "out_features") else weight_matrix(base).shape
        return (r, d_in), (d_out, r)

    def _low_rank(self, x, a, b, scale=None):
        hidden = F.linear(x, a)
        return F.linear(hidden if scale is None else hidden * scale, b)

    def _delta_from_matrix(self, delta):
        return delta.T if self.fan_in_fan_out else delta



class ConvFactors:
    """nn.Conv1d/2d/3d: A convolves like the base layer (kernel, stride, padding, dilation); B is pointwise."""

    def _factor_shapes(self, r):
        base = self.get_base_layer()
        # A convolves like the base layer (its kernel), B is pointwise
        return (r, base.in_channels, *base.kernel_size), (base.out_channels, r) + (1,) * len(base.kernel_size)

    def _low_rank(self, x, a, b, scale=None):
        base = self.get_base_layer()
        hidden = base._conv_forward(x, a, None)
        if scale is not None:
            hidden = hidden * scale.reshape(-1, *([1] * len(base.kernel_size)))
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



class EmbeddingFactors:
    """nn.Embedding: the factorised matrix is W^T (dim, num_embeddings), as in peft's LoRA; A is a lookup table."""

    supports_dropout = False  # token ids cannot be dropped out; peft's LoRA embedding has no dropout either

    def _factor_shapes(self, r):
        base = self.get_base_layer()
        return (base.num_embeddings, r), (base.embedding_dim, r)  # A is a lookup table of r-vectors

    def _low_rank(self, x, a, b, scale=None):
        hidden = F.embedding(x, a, padding_idx=self.get_base_layer().padding_idx)
        return F.linear(hidden if scale is None else hidden * scale, b)

    def _factor_weights(self, a_matrix, b_matrix):
        return a_matrix.T, b_matrix

    def _factor_matrices(self, a_weight, b_weight):
        return a_weight.T, b_weight

    def _delta_from_matrix(self, delta):
        return delta.T



def geometry_for(base: nn.Module) -> type:
    if isinstance(base, CONV_TYPES):
        return ConvFactors
    if isinstance(base, nn.Embedding):
        return EmbeddingFactors
    return LinearFactors


def create_layer(classes: dict[type, type], target: nn.Module, adapter_name: str, **kwargs) -> nn.Module:
    """Wrap ``target`` in the method's class for its geometry (``classes`` maps geometry mixin -> layer class)."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    return classes[geometry_for(base)](target, adapter_name, **kwargs)
