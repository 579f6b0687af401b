from __future__ import annotations

import math

import torch
from torch import nn

from ..base import CONV_TYPES, InitCall, LayerPlan, PlannedTuner, Target, geometry_for, pattern_value
from .config import FLoRAConfig, RankSpec
from .layer import FLoRALayer


def user_mode_names(n_modes: int) -> list[str]:
    """Mode names in the order users write ranks: (in, out, k_1, ...)."""
    return ["in", "out"] + [f"k_{i}" for i in range(1, n_modes - 1)]


def resolve_ranks(spec: RankSpec, target: Target) -> tuple[int, ...]:
    """Per-mode ranks in weight order (out, in, k_1, ...) from an int (a cap) or a tuple (in, out, k_1, ...)."""
    sizes = geometry_for(target.base).mode_sizes
    if isinstance(spec, int):
        return tuple(min(spec, size) for size in sizes)
    spec = tuple(spec)
    names = user_mode_names(len(sizes))
    user_sizes = (sizes[1], sizes[0]) + sizes[2:]
    if len(spec) != len(sizes):
        raise ValueError(
            f"FLoRA ranks {spec} for layer '{target.key}' have {len(spec)} entries, but its weight has {len(sizes)} "
            f"modes ({', '.join(names)}) of sizes {user_sizes}: give one rank per mode (set rank_pattern for it)."
        )
    for name, rank, size in zip(names, spec, user_sizes):
        if rank > size:
            hint = (
                " (a depthwise/grouped convolution: c_in / groups)"
                if name == "in" and isinstance(target.base, CONV_TYPES) and target.base.groups > 1
                else ""
            )
            raise ValueError(
                f"FLoRA rank {rank} for mode '{name}' of layer '{target.key}' exceeds that mode's size {size}{hint}: "
                f"choose at most {size} (set rank_pattern for this layer)."
            )
    return (spec[1], spec[0]) + spec[2:]


class FLoRAModel(PlannedTuner):
    """Creates a FLoRA model: a Tucker-decomposed update (zero core, so identity at init) on every targeted layer.

    All ranks are resolved and checked for every target before any module is replaced; a ValueError leaves the model
    as it was.
    """

    prefix: str = "flora_"
    method_name = "FLoRA"
    tuner_layer_cls = FLoRALayer
    supports_grouped_conv = True

    def _rank(self, target: Target, config: FLoRAConfig) -> tuple[int, ...]:
        spec = pattern_value(config.rank_pattern, target.key, None)
        if spec is None:
            conv = isinstance(target.base, CONV_TYPES)
            spec = config.conv_ranks if conv and config.conv_ranks is not None else config.r
        return resolve_ranks(spec, target)

    def _plan_layer(self, target: Target, config: FLoRAConfig) -> LayerPlan:
        return LayerPlan(target, self._rank(target, config), scale=config.scale, dropout=config.flora_dropout)

    def _initial_factors(self, plans: dict[str, LayerPlan], config: FLoRAConfig, call: InitCall) -> dict:
        return {key: initial_tucker_factors(plan) for key, plan in plans.items()}


def initial_tucker_factors(plan: LayerPlan) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """FLoRA's init: a zero core (so the update is zero) and Kaiming-uniform factors (size_m, r_m), on the base
    weight's device."""
    device = plan.target.base.weight.device
    core = torch.zeros(plan.r, device=device)
    factors = []
    for size, rank in zip(geometry_for(plan.target.base).mode_sizes, plan.r):
        factor = torch.empty((size, rank), device=device)
        nn.init.kaiming_uniform_(factor, a=math.sqrt(5))
        factors.append(factor)
    return core, factors
