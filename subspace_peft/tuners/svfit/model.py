from __future__ import annotations

from ...linalg.svd import energy_rank, singular_values
from ..base import SVDTuner, Target, pattern_value, weight_matrix
from ..base.config import is_saved_adapter_config
from .config import SVFitConfig
from .layer import SVFitLayer


class SVFitModel(SVDTuner):
    """Creates an SVFit model: each targeted weight's top-r singular values become its only trainable parameters.

    Checks and SVDs run for every target before any module is replaced; a ValueError leaves the model as it was.
    Ranks chosen by ``energy`` are recorded in the config (``energy_ranks``), so a saved adapter reloads without SVD.
    """

    prefix: str = "svfit_"
    method_name = "SVFit"
    tuner_layer_cls = SVFitLayer

    def _rank(self, target: Target, config: SVFitConfig) -> int:
        r = pattern_value(config.rank_pattern, target.key, None)
        if r is not None:
            return r
        if config.energy is None:
            return config.r
        if is_saved_adapter_config(config):
            r = (config.energy_ranks or {}).get(target.key)
            if r is None:
                raise ValueError(
                    f"this SVFit adapter chose its ranks by energy={config.energy} but its config records no rank for "
                    f"layer '{target.key}' (energy_ranks): it was saved for another model or by an older version. "
                    "Load it onto the base model it was trained on, or save it again with this version."
                )
            return r
        return energy_rank(singular_values(weight_matrix(target.base)), config.energy)

    def _check_plan(self, model, config: SVFitConfig, plan: dict) -> None:
        if config.energy is not None and not is_saved_adapter_config(config):
            config.energy_ranks = {key: layer_plan.r for key, layer_plan in plan.items()}
