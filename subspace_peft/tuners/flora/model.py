from __future__ import annotations

from ..planned_tuner import PlannedLayer, PlannedTuner
from ..targets import CONV_TYPES, Target, pattern_value
from .config import FLoRAConfig, RankSpec
from .layer import FLoRALayer, create_layer, mode_sizes


def user_mode_names(n_modes: int) -> list[str]:
    """Mode names in the order users write ranks: (in, out, k_1, ...)."""
    return ["in", "out"] + [f"k_{i}" for i in range(1, n_modes - 1)]


def resolve_ranks(spec: RankSpec, target: Target) -> tuple[int, ...]:
    """Per-mode ranks in weight order (out, in, k_1, ...) from an int (a cap) or a tuple (in, out, k_1, ...)."""
    sizes = mode_sizes(target.base)
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
            hint = " (a depthwise/grouped convolution: c_in / groups)" if name == "in" and isinstance(
                target.base, CONV_TYPES) and target.base.groups > 1 else ""
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

    def _initial_factors(self, plan: dict, config: FLoRAConfig) -> dict:
        # FLoRA's layers initialise themselves (zero core, Kaiming factors): nothing to compute up front
        return {key: True for key in plan}

    def _layer_kwargs(self, config: FLoRAConfig, planned: PlannedLayer, factors) -> dict:
        return dict(ranks=planned.r, scale=config.scale, dropout=config.flora_dropout, init_weights=factors is not None)

    def _new_module(self, config: FLoRAConfig, adapter_name, target, planned, layer_kwargs):
        return create_layer(target, adapter_name, **layer_kwargs)
