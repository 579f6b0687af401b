"""The model side all our tuners share: plan and check every target, prepare every layer's initial tensors, then
inject.

Subclasses say how a layer's rank is chosen and checked (``_rank``, ``_check_rank``, ``_check_plan``), which
initial tensors it starts from (``_initial_factors``: SVD factors for the SVD-initialised methods) and how a layer is
built (``_layer_kwargs`` and ``_new_module``). Everything that can fail runs before the first module is replaced, so a
ValueError leaves the user's model exactly as it was.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from .targets import Target, check_checkpoint_shapes, check_target, find_targets


@dataclass
class PlannedLayer:
    target: Target
    r: Any  # the method's rank: an int, or per-mode ranks


class PlannedTuner(BaseTuner):
    method_name: str  # as users write it, for error messages
    supports_grouped_conv = False
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def inject_adapter(
        self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False,
        state_dict=None,
    ) -> None:
        config = self.peft_config[adapter_name]
        plan = self._plan(model, config)
        factors = None if low_cpu_mem_usage else self._initial_factors(plan, config)
        self._pending = {"plan": plan, "factors": factors, "low_cpu_mem_usage": low_cpu_mem_usage}
        try:
            super().inject_adapter(
                model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict,
            )
        finally:
            del self._pending

    @abstractmethod
    def _rank(self, target: Target, config) -> Any:
        """The rank this method gives ``target`` under ``config``."""

    def _check_rank(self, target: Target, rank: Any) -> None:
        """Raise a ValueError naming the layer if ``rank`` does not fit it."""

    def _check_plan(self, model: nn.Module, config, plan: dict) -> None:
        """Method-specific checks of the whole plan (raise ValueError)."""

    def _initial_factors(self, plan: dict, config) -> dict:
        """Per planned layer, the tensors it starts from; by default none (the layer initialises itself)."""
        return {key: None for key in plan}

    def _layer_kwargs(self, config, planned: PlannedLayer, factors) -> dict:
        """Keyword arguments of the layer's ``update_layer``; by default the rank and the initial tensors."""
        return dict(r=planned.r, factors=factors)

    @abstractmethod
    def _new_module(self, config, adapter_name: str, target: nn.Module, planned: PlannedLayer, factors, layer_kwargs):
        """(new tuner layer wrapping ``target``, the module it replaces in the model)."""

    def _plan(self, model: nn.Module, config) -> dict[str, PlannedLayer]:
        plan = {}
        for target in find_targets(self, model, config):
            check_target(target, self.method_name, grouped_ok=self.supports_grouped_conv)
            plan[target.key] = PlannedLayer(target, self._rank(target, config))
            self._check_rank(target, plan[target.key].r)
        self._check_plan(model, config, plan)
        return plan

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_checkpoint_shapes(model, remapped, cls.method_name)
        return remapped

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        planned = self._pending["plan"][current_key]
        factors = None if self._pending["factors"] is None else self._pending["factors"].pop(current_key)
        layer_kwargs = self._layer_kwargs(config, planned, factors)
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, **layer_kwargs)
            return
        new_module, replaced = self._new_module(config, adapter_name, target, planned, factors, layer_kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, replaced)
