"""The model side of the SVD-initialised tuners (PiSSA, SVFit, Effort): every target's SVD is taken (or read from
the cache) before the first module is replaced; subclasses say which initial tensors a layer takes from its
singular triplets (``_factors_from_svd``)."""

from __future__ import annotations

import torch

from ..linalg.cache import SVDCache
from ..linalg.svd import truncated_svds
from .planned_tuner import PlannedLayer, PlannedTuner
from .targets import Target, check_rank, weight_matrix

__all__ = ["PlannedLayer", "SVDTuner", "svd_cache_for"]


def svd_cache_for(config) -> SVDCache | None:
    if not config.svd_cache:
        return None
    return SVDCache(None if config.svd_cache is True else config.svd_cache)


class SVDTuner(PlannedTuner):
    def _check_rank(self, target: Target, rank: int) -> None:
        check_rank(target, rank, self.method_name)

    def _factors_from_svd(self, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, planned: PlannedLayer, config):
        """The layer's initial tensors from its singular triplets; by default ``(Vh, U, S)``."""
        return vh, u, s

    def _initial_factors(self, plan: dict, config) -> dict:
        weights = {key: weight_matrix(layer.target.base) for key, layer in plan.items()}
        ranks = {key: layer.r for key, layer in plan.items()}
        svds = truncated_svds(weights, ranks, config.svd_settings(), svd_cache_for(config), desc=f"{self.method_name} init")
        return {key: self._factors_from_svd(*svds.pop(key), plan[key], config) for key in list(svds)}
