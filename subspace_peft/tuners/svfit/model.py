from __future__ import annotations

import copy

from ...linalg.svd import energy_rank
from ..base import LayerPlan, SVDTuner, Target, pattern_value
from ..base.config import is_saved_adapter_config
from ..base.distributed import singular_value_spectra
from .config import SVFitConfig
from .layer import SVFitLayer


class SVFitModel(SVDTuner):
    """Creates an SVFit model: each targeted weight's top-r singular values become its only trainable parameters.

    Checks and SVDs run for every target before any module is replaced; a ValueError leaves the model as it was.
    Ranks chosen by ``energy`` are recorded in the adapter's config (``energy_ranks``, a copy of the config given),
    so a saved adapter reloads without SVD.
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
        r = (config.energy_ranks or {}).get(target.key)
        if r is None:
            raise ValueError(
                f"this SVFit adapter chose its ranks by energy={config.energy} but its config records no rank for "
                f"layer '{target.key}' (energy_ranks): it was saved for another model or by an older version. "
                "Load it onto the base model it was trained on, or save it again with this version."
            )
        return r

    def _plan_layers(self, targets: list[Target], config: SVFitConfig) -> dict[str, LayerPlan]:
        if not _chooses_ranks_by_energy(config):
            return super()._plan_layers(targets, config)
        # ranks chosen by energy need every target's singular values: computed in one pass first (split across the
        # ranks of a torch.distributed job, like the init's SVDs)
        by_energy = {t.key: t.base for t in targets if pattern_value(config.rank_pattern, t.key, None) is None}
        spectra = singular_value_spectra(by_energy, self.method_name) if by_energy else {}
        return {
            t.key: LayerPlan(t, energy_rank(spectra[t.key], config.energy))
            if t.key in spectra
            else self._plan_layer(t, config)
            for t in targets
        }

    def _recorded_config(self, config: SVFitConfig, plans: dict[str, LayerPlan]) -> SVFitConfig:
        if not _chooses_ranks_by_energy(config):
            return config
        recorded = copy.copy(config)
        recorded.energy_ranks = {key: plan.r for key, plan in plans.items()}
        return recorded


def _chooses_ranks_by_energy(config: SVFitConfig) -> bool:
    """Whether the weights choose this config's ranks (``energy``, not yet recorded by a saved adapter)."""
    return config.energy is not None and not is_saved_adapter_config(config)
