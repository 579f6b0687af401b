"""The model side every SVD-initialised tuner shares: plan and check all targets, take every SVD, then inject.

Subclasses say how a layer's rank is chosen (``_rank``), which initial tensors the SVD gives (``_factors_from_svd``)
and how a layer is built (``_layer_kwargs`` and ``_new_module``). Everything that can fail runs before the first
module is replaced, so a ValueError leaves the user's model exactly as it was.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from ..linalg.cache import SVDCache
from ..linalg.svd import truncated_svds
from .targets import Target, check_checkpoint_shapes, check_rank, check_target, find_targets, weight_matrix


def svd_cache_for(config) -> SVDCache | None:
    if not config.svd_cache:
        return None
    return SVDCache(None if config.svd_cache is True else config.svd_cache)


@dataclass
class PlannedLayer:
    target: Target
    r: int


class SVDTuner(BaseTuner):
    method_name: str  # as users write it, for error messages
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def inject_adapter(
        self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False,
        state_dict=None,
    ) -> None:
        config = self.peft_config[adapter_name]
        plan = self._plan(model, config)
        factors = None if low_cpu_mem_usage else self._initial_factors(plan, config)
        self._pending = {"plan": plan, "factors": factors}
        try:
            super().inject_adapter(
                model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict,
            )
        finally:
            del self._pending

    @abstractmethod
    def _rank(self, target: Target, config) -> int:
        """The rank this method gives ``target`` under ``config``."""

    def _factors_from_svd(self, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, planned: PlannedLayer, config):
        """The layer's initial tensors from its singular triplets; by default ``(Vh, U, S)``."""
        return vh, u, s

    def _layer_kwargs(self, config, planned: PlannedLayer, factors) -> dict:
        """Keyword arguments of the layer's ``update_layer``; by default the rank and the initial tensors."""
        return dict(r=planned.r, factors=factors)

    @abstractmethod
    def _new_module(self, config, adapter_name: str, target: nn.Module, planned: PlannedLayer, factors, layer_kwargs):
        """(new tuner layer wrapping ``target``, the module it replaces in the model)."""

    def _check_plan(self, model: nn.Module, config, plan: dict) -> None:
        """Method-specific checks of the whole plan (raise ValueError)."""

    def _plan(self, model: nn.Module, config) -> dict[str, PlannedLayer]:
        plan = {}
        for target in find_targets(self, model, config):
            check_target(target, self.method_name)
            plan[target.key] = PlannedLayer(target, self._rank(target, config))
            check_rank(target, plan[target.key].r, self.method_name)
        self._check_plan(model, config, plan)
        return plan

    def _initial_factors(self, plan: dict, config) -> dict:
        weights = {key: weight_matrix(layer.target.base) for key, layer in plan.items()}
        ranks = {key: layer.r for key, layer in plan.items()}
        svds = truncated_svds(weights, ranks, config.svd_settings(), svd_cache_for(config), desc=f"{self.method_name} init")
        return {key: self._factors_from_svd(*svds.pop(key), plan[key], config) for key in list(svds)}

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
