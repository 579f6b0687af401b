from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from ...linalg.cache import SVDCache
from ...linalg.svd import truncated_svds
from ..targets import check_checkpoint_shapes, check_target, find_targets, pattern_value, weight_matrix
from .bnb import quantize_residual, require_bitsandbytes
from .config import PiSSAConfig
from .layer import PiSSALayer, create_layer


def svd_cache_for(config) -> SVDCache | None:
    if not config.svd_cache:
        return None
    return SVDCache(None if config.svd_cache is True else config.svd_cache)


def pissa_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, scaling: float):
    """PiSSA's initial factors (paper eq. 2-3): A = diag(sqrt(S/s)) V^T, B = U diag(sqrt(S/s)), so s B A = U S V^T."""
    root = torch.sqrt(s / scaling)
    return root[:, None] * vh, u * root[None, :]


class PiSSAModel(BaseTuner):
    """Creates a PiSSA model from a pretrained transformers model (or any torch model with supported layers).

    Before any module is replaced, every target is checked (layer type, dtype, finite weights, rank) and all SVDs are
    computed in one pass (batched where that is faster, read from the on-disk cache when enabled, with a progress bar).
    A failing check raises a ValueError and leaves the model exactly as it was.
    """

    prefix: str = "pissa_"
    tuner_layer_cls = PiSSALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def inject_adapter(
        self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False,
        state_dict=None,
    ) -> None:
        config: PiSSAConfig = self.peft_config[adapter_name]
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

    def _plan(self, model: nn.Module, config: PiSSAConfig) -> dict:
        """key -> (target, r, alpha) for every layer to adapt; raises ValueError before anything changes."""
        plan = {}
        for target in find_targets(self, model, config):
            r = pattern_value(config.rank_pattern, target.key, config.r)
            alpha = pattern_value(config.alpha_pattern, target.key, config.lora_alpha)
            check_target(target, r, "PiSSA")
            plan[target.key] = (target, r, alpha)
        if config.residual_quantization:
            self._check_qpissa(model, plan)
        elif any(isinstance(m, PiSSALayer) and any(m.residual_in_base.values()) for m in model.modules()):
            raise ValueError(
                "this model's base layers hold a QPiSSA residual of another adapter; a second PiSSA adapter on it "
                "would be initialised from that residual. Build a new QPiSSA model from the full-precision base."
            )
        return plan

    @staticmethod
    def _check_qpissa(model: nn.Module, plan: dict) -> None:
        require_bitsandbytes()
        if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            raise ValueError(
                "QPiSSA (residual_quantization) replaces the base weights by one adapter's quantised residual, so it "
                "must be the model's first and only adapter: start from the full-precision base model"
            )
        for key, (target, _r, _alpha) in plan.items():
            if type(target.base) is not nn.Linear:
                raise ValueError(
                    f"QPiSSA quantises nn.Linear residuals only, but layer '{key}' is {type(target.base).__name__}: "
                    "restrict target_modules to linear layers or set residual_quantization=None"
                )

    @staticmethod
    def _initial_factors(plan: dict, config: PiSSAConfig) -> dict:
        weights = {key: weight_matrix(target.base) for key, (target, _r, _a) in plan.items()}
        ranks = {key: r for key, (_t, r, _a) in plan.items()}
        svds = truncated_svds(weights, ranks, config.svd_settings(), svd_cache_for(config), desc="PiSSA init")
        factors = {}
        for key in list(svds):
            _target, r, alpha = plan[key]
            factors[key] = pissa_factors(*svds.pop(key), scaling=alpha / r)
        return factors

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_checkpoint_shapes(model, remapped, "PiSSA")
        return remapped

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        _target, r, alpha = self._pending["plan"][current_key]
        factors = None if self._pending["factors"] is None else self._pending["factors"].pop(current_key)
        layer_kwargs = dict(
            r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout, factors=factors,
            residual_in_base=bool(config.residual_quantization),
        )
        if isinstance(target, PiSSALayer):
            target.update_layer(adapter_name, **layer_kwargs)
            return
        if config.residual_quantization:
            if factors is None:
                raise ValueError(
                    "QPiSSA cannot be loaded with low_cpu_mem_usage=True: its quantised residual is computed from the "
                    "full-precision base while the adapter is built. Load with low_cpu_mem_usage=False."
                )
            a, b = factors
            residual = target.weight.float() - (alpha / r) * (b @ a)
            target = quantize_residual(target, residual, config.residual_quantization)
        new_module = create_layer(target, adapter_name, **layer_kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
