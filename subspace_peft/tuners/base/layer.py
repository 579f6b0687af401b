"""What every tuner layer of the family shares: construction from a layer plan, adapter tensors, merging, forward.

A method's update is a sum of rank-r products ``B A x`` with ``A`` (r, d_in) and ``B`` (d_out, r) matrices. How such
a pair is stored and applied depends on the layer type only (``self.geometry``, see ``geometry.py``); what trains and
how the update is formed depends on the method (its one ``FactorLayer`` subclass). The base weight itself is never
rewritten.
"""

from __future__ import annotations

import warnings
from abc import abstractmethod
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn

from .geometry import geometry_for
from .leaf import SingularValues, TensorLeaf, unfilled
from .plan import LayerPlan


class FactorLayer(nn.Module, BaseTunerLayer):
    """A tuner layer wrapping any supported ``base_layer``, constructed like peft's layers with its first adapter.

    Subclasses create their adapter containers in ``_init_adapter_containers`` and add an adapter from its
    :class:`LayerPlan` in ``update_layer``; merging, unmerging and the forward pass follow from ``get_delta_weight``
    and ``_adapter_output``.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, plan: LayerPlan) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.geometry = geometry_for(self.get_base_layer())
        self.r: dict[str, Any] = {}
        self.awaiting_checkpoint: set[str] = set()  # adapters built empty, whose checkpoint has not been loaded yet
        # adapters built empty by peft.inject_adapter_in_model (transformers' load_adapter, adapter folders, pipelines):
        # their loader fills the tensors with no hook of ours after it, so the layer finishes itself on first use
        self.finish_after_outside_load: dict[str, Any] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._init_adapter_containers()
        # as on peft's LoRA layers (code that inspects adapted layers reads them): Linear/Conv1D in and out features,
        # ConvNd channels, Embedding (num_embeddings, embedding_dim)
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, plan)

    @property
    def supports_dropout(self) -> bool:
        return self.geometry.supports_dropout

    @property
    def fan_in_fan_out(self) -> bool:
        return self.geometry.fan_in_fan_out

    # -- per method -------------------------------------------------------------------------------------------------
    @abstractmethod
    def _init_adapter_containers(self) -> None:
        """Create the method's (empty) per-adapter ModuleDicts and dicts."""

    @abstractmethod
    def update_layer(self, adapter_name: str, plan: LayerPlan) -> None:
        """Add (or replace) adapter ``adapter_name`` as ``plan`` says (``plan.factors is None``: empty tensors for a
        checkpoint to fill in)."""

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
            return tuple(TensorLeaf(shape, device, trainable) for shape in self.geometry.factor_shapes(r))
        weights = [
            value.to(device).clone(memory_format=torch.contiguous_format)
            for value in self.geometry.factor_weights(*factors)
        ]
        return tuple(TensorLeaf(weight, trainable=trainable) for weight in weights)

    def _new_singular_values(self, r: int, values: Optional[torch.Tensor]) -> tuple[nn.Module, nn.Module]:
        """(trainable, frozen) leaf modules of ``r`` singular values, both holding ``values`` (None: empty, for a
        checkpoint to fill in)."""
        device = self.get_base_layer().weight.device
        current, initial = SingularValues(r, device), SingularValues(r, device, trainable=False)
        if values is not None:
            with torch.no_grad():
                current.weight.copy_(values)
                initial.weight.copy_(values)
        return current, initial

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
        if adapter not in self.awaiting_checkpoint:
            return
        finish = self.finish_after_outside_load.get(adapter)
        if finish is not None and not any(unfilled(tensor) for _, _, tensor in self.adapter_tensors(adapter)):
            finish()  # transformers' loader filled every tensor: complete the layer as a peft load would
            self.awaiting_checkpoint.discard(adapter)
            del self.finish_after_outside_load[adapter]
            return
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
            raise ValueError(
                f"adapter_names has {len(adapter_names)} entries for a batch of {x.shape[0]} rows: "
                "give one adapter name (or '__base__') per row"
            )
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
