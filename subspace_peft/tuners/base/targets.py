"""Finding and checking the layers a tuner adapts, before anything in the model changes.

Every check here runs on the whole list of targets first, so that bad input raises a ValueError naming the layer
and the fix while the user's model is still exactly as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _maybe_include_all_linear_layers
from peft.utils.other import get_pattern_key
from torch import nn

from ...checks import all_finite
from .geometry import CONV_TYPES, SUPPORTED_NAMES, SUPPORTED_TYPES, full_shape, matrix_shape


@dataclass
class Target:
    key: str  # module name in the model
    base: nn.Module  # the innermost base layer (the module itself unless an adapter already wraps it)


def base_layer_of(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def find_targets(tuner, model: nn.Module, config) -> list[Target]:
    """The modules ``inject_adapter`` will adapt, found with peft's own matching rules (all-linear included)."""
    config = tuner._prepare_adapter_config(config, tuner.get_model_config(model))
    config = _maybe_include_all_linear_layers(config, model)
    adapter_prefixes = [key + "." for key, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    targets = []
    for key, module in model.named_modules():
        if not key or any(key.startswith(prefix) for prefix in adapter_prefixes):
            continue
        matched = tuner._check_target_module_exists(config, key)
        if matched and type(matched).__name__ != "_ExcludedModule":
            targets.append(Target(key=key, base=base_layer_of(module)))
    if not targets:
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no module of the model; pass names that exist "
            "(e.g. ['q_proj', 'v_proj']), a regex, or 'all-linear'"
        )
    return targets


def pattern_value(pattern: dict | None, key: str, default):
    if not pattern:
        return default
    return pattern.get(get_pattern_key(list(pattern.keys()), key), default)


def check_target(target: Target, method: str, grouped_ok: bool = False, finite: bool = True) -> None:
    """Raise a ValueError naming the layer and the fix if ``method`` cannot adapt it (type, dtype, and unless
    ``finite=False``, finite weights: see :func:`check_finite`). Grouped convolutions only where ``grouped_ok``
    (their weight is block-diagonal: no low-rank SVD update fits)."""
    base = target.base
    if not isinstance(base, SUPPORTED_TYPES):
        raise ValueError(
            f"{method} cannot adapt layer '{target.key}' of type {type(base).__name__}: supported are "
            f"{SUPPORTED_NAMES}. Remove it from target_modules (or add it to exclude_modules)."
        )
    if isinstance(base, CONV_TYPES) and base.groups != 1 and not grouped_ok:
        raise ValueError(
            f"{method} cannot adapt grouped convolution '{target.key}' (groups={base.groups}): its weight is "
            "block-diagonal, so a low-rank SVD update does not fit it. Add it to exclude_modules."
        )
    weight = base.weight
    if not weight.dtype.is_floating_point:
        raise ValueError(
            f"{method} needs a floating-point base weight, but layer '{target.key}' holds {weight.dtype} "
            "(a quantised model?). Load the base model in full precision; for a 4-/8-bit residual use "
            "PiSSAConfig(residual_quantization='nf4' or 'int8') on the full-precision model (QPiSSA)."
        )
    if finite:
        check_finite(target.key, weight)


def check_finite(key: str, weight: torch.Tensor) -> None:
    """Raise a ValueError naming layer ``key`` if its weight holds NaN or Inf."""
    if weight.device.type != "meta" and not all_finite(weight):
        raise ValueError(
            f"layer '{key}' has NaN or Inf in its weight: fix or reload the base weights, or exclude the layer from "
            "target_modules."
        )


def check_rank(target: Target, rank: int, method: str) -> None:
    """Raise a ValueError naming the layer and the fix if ``rank`` does not fit the layer's weight."""
    max_rank = min(matrix_shape(target.base))
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"{method} rank for layer '{target.key}' must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise ValueError(
            f"{method} rank r={rank} is larger than min(d_out, d_in) = {max_rank} of layer '{target.key}' "
            f"(weight {full_shape(target.base.weight)}): choose r <= {max_rank} (set rank_pattern for this layer)."
        )
