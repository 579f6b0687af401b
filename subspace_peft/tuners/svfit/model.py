from __future__ import annotations

import torch

from ...linalg.svd import energy_rank
from ..svd_tuner import SVDTuner
from ..targets import Target, pattern_value, weight_matrix
from .config import SVFitConfig
from .layer import SVFitLayer, create_layer


class SVFitModel(SVDTuner):
    """Creates an SVFit model: each targeted weight's top-r singular values become its only trainable parameters.

    Checks and SVDs run for every target before any module is replaced; a ValueError leaves the model as it was.
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
        spectrum = torch.linalg.svdvals(weight_matrix(target.base).detach().float())
        return energy_rank(spectrum, config.energy)

    def _new_module(self, config: SVFitConfig, adapter_name, target, planned, factors, layer_kwargs):
        return create_layer(target, adapter_name, **layer_kwargs), target
