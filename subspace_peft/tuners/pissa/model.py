from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..svd_tuner import PlannedLayer, SVDTuner
from ..targets import Target, pattern_value
from .bnb import require_bitsandbytes
from .config import PiSSAConfig
from .layer import PiSSALayer, create_layer


def pissa_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, scaling: float):
    """PiSSA's initial factors (paper eq. 2-3): A = diag(sqrt(S/s)) V^T, B = U diag(sqrt(S/s)), so s B A = U S V^T."""
    root = torch.sqrt(s / scaling)
    return root[:, None] * vh, u * root[None, :]


class PiSSAModel(SVDTuner):
    """Creates a PiSSA model from a pretrained transformers model (or any torch model with supported layers).

    Before any module is replaced, every target is checked (layer type, dtype, finite weights, rank) and all SVDs are
    computed in one pass (batched where that is faster, read from the on-disk cache when enabled, with a progress bar).
    A failing check raises a ValueError and leaves the model exactly as it was.
    """

    prefix: str = "pissa_"
    method_name = "PiSSA"
    tuner_layer_cls = PiSSALayer

    def _rank(self, target: Target, config: PiSSAConfig) -> int:
        return pattern_value(config.rank_pattern, target.key, config.r)

    @staticmethod
    def _alpha(planned: PlannedLayer, config: PiSSAConfig) -> float:
        return pattern_value(config.alpha_pattern, planned.target.key, config.lora_alpha)

    def _check_plan(self, model: nn.Module, config: PiSSAConfig, plan: dict) -> None:
        if config.residual_quantization:
            self._check_qpissa(model, plan)
        elif any(isinstance(m, PiSSALayer) and any(m.residual_in_base.values()) for m in model.modules()):
            raise ValueError(
                "this model's base layers hold a QPiSSA residual of another adapter; a second PiSSA adapter on it "
                "would be initialised from that residual. Build a new QPiSSA model from the full-precision base."
            )

    @staticmethod
    def _check_qpissa(model: nn.Module, plan: dict) -> None:
        require_bitsandbytes()
        if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            raise ValueError(
                "QPiSSA (residual_quantization) replaces the base weights by one adapter's quantised residual, so it "
                "must be the model's first and only adapter: start from the full-precision base model"
            )
        for key, planned in plan.items():
            if type(planned.target.base) is not nn.Linear:
                raise ValueError(
                    f"QPiSSA quantises nn.Linear residuals only, but layer '{key}' is "
                    f"{type(planned.target.base).__name__}: restrict target_modules to linear layers or set "
                    "residual_quantization=None"
                )

    def _factors_from_svd(self, u, s, vh, planned: PlannedLayer, config: PiSSAConfig):
        return pissa_factors(u, s, vh, scaling=self._alpha(planned, config) / planned.r)

    def _layer_kwargs(self, config: PiSSAConfig, planned: PlannedLayer, factors) -> dict:
        return dict(
            r=planned.r, lora_alpha=self._alpha(planned, config), lora_dropout=config.lora_dropout, factors=factors,
        )

    def _new_module(self, config: PiSSAConfig, adapter_name, target, planned, layer_kwargs):
        return create_layer(target, adapter_name, **layer_kwargs)

    def _finish_layer(self, layer: PiSSALayer, adapter_name: str, config: PiSSAConfig) -> None:
        if config.residual_quantization:
            layer.quantize_residual_into_base(adapter_name, config.residual_quantization, config.residual_quant_storage)
