from __future__ import annotations

from ...linalg.svd import energy_rank
from ..base import SVDTuner, Target, pattern_value
from ..base.config import is_saved_adapter_config
from ..base.distributed import singular_value_spectra
from ..base.targets import check_target, find_targets
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
        return energy_rank(self._spectra[target.key], config.energy)

    def _plan(self, model, config: SVFitConfig):
        # ranks chosen by energy need every target's singular values: computed in one pass first (split across the
        # ranks of a torch.distributed job, like the init's SVDs)
        self._spectra = {}
        if config.energy is not None and not is_saved_adapter_config(config):
            targets = find_targets(self, model, config)
            for target in targets:
                check_target(target, self.method_name)
            by_energy = {t.key: t.base for t in targets if pattern_value(config.rank_pattern, t.key, None) is None}
            self._spectra = singular_value_spectra(by_energy, self.method_name) if by_energy else {}
        try:
            return super()._plan(model, config)
        finally:
            self._spectra = {}

    def _check_plan(self, model, config: SVFitConfig, plan: dict) -> None:
        if config.energy is not None and not is_saved_adapter_config(config):
            config.energy_ranks = {key: layer_plan.r for key, layer_plan in plan.items()}
