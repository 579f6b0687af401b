"""Task vectors: what fine-tuning changed, per parameter of the base model.

A task vector is a dict ``{parameter name in the base model: fine-tuned value - base value}``. It comes from a fully
fine-tuned model that shares the base's architecture (:func:`task_vector`) or from an adapter of any peft method on
the base (:func:`adapter_task_vector`, through each tuner layer's ``get_delta_weight``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..checks import all_finite, number

TaskVector = dict[str, torch.Tensor]

# A fine-tune moves the weights by a few percent of their norm; a distance this large means another base model.
DEFAULT_MAX_RELATIVE_DISTANCE = 0.5


def _parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.is_floating_point()}


def _check_distance(vector: TaskVector, base_params: dict, max_relative_distance: Optional[float], what: str) -> None:
    if max_relative_distance is None:
        return
    moved = math.sqrt(sum(float(delta.double().pow(2).sum()) for delta in vector.values()))
    size = math.sqrt(sum(float(base_params[name].detach().double().pow(2).sum()) for name in vector))
    if moved > max_relative_distance * max(size, 1e-30):
        raise ValueError(
            f"{what} differs from the base model by {moved / size:.2f} of the base's norm (more than "
            f"max_relative_distance={max_relative_distance}): it does not look like a fine-tune of this base. Pass "
            "the base it was fine-tuned from, or max_relative_distance=None to skip this check."
        )


@torch.no_grad()
def task_vector(
    base: nn.Module, finetuned: nn.Module, max_relative_distance: Optional[float] = DEFAULT_MAX_RELATIVE_DISTANCE
) -> TaskVector:
    """``finetuned - base`` for every floating-point parameter of ``base`` (parameters only ``finetuned`` has, such as
    a task head, are left out: keep them with that task). Neither model is modified.

    Raises a ValueError naming the parameter if ``finetuned`` lacks one of the base's parameters or holds it with
    another shape, if either model holds NaN or Inf in it, and if the whole difference is larger than
    ``max_relative_distance`` (a finite number > 0, or None) times the base's norm (a fine-tune of another base).
    """
    if max_relative_distance is not None:
        number(
            "task_vector",
            "max_relative_distance",
            max_relative_distance,
            f"pass e.g. {DEFAULT_MAX_RELATIVE_DISTANCE} (the default), or None to skip the distance check",
            low=0.0,
            low_open=True,
        )
    base_params, tuned_params = _parameters(base), _parameters(finetuned)
    missing = [name for name in base_params if name not in tuned_params]
    if missing:
        raise ValueError(
            f"the fine-tuned model has no parameter {missing[0]!r} (and {len(missing) - 1} more) of the base model: "
            "task vectors need a fine-tune of the same architecture"
        )
    for name, value in base_params.items():
        if tuned_params[name].shape != value.shape:
            raise ValueError(
                f"parameter {name!r} has shape {tuple(tuned_params[name].shape)} in the fine-tuned model but "
                f"{tuple(value.shape)} in the base: the models do not share a base"
            )
    vector = {
        name: (tuned_params[name].detach().to(value.dtype) - value.detach()).clone()
        for name, value in base_params.items()
    }
    for name, delta in vector.items():  # one reduction per tensor; the culprit is looked for only on failure
        if not all_finite(delta):
            if not all_finite(base_params[name].detach()):
                problem = f"the base model holds NaN or Inf in parameter {name!r}"
            elif not all_finite(tuned_params[name].detach()):
                problem = f"the fine-tuned model holds NaN or Inf in parameter {name!r}"
            else:
                problem = f"fine-tuned - base overflows {delta.dtype} in parameter {name!r}"
            raise ValueError(
                f"task_vector: {problem}: a task vector must be finite. Fix or reload that model's weights (a "
                "diverged fine-tune has no usable task vector)."
            )
    _check_distance(vector, base_params, max_relative_distance, "the fine-tuned model")
    return vector


@torch.no_grad()
def adapter_task_vector(peft_model, adapter_name: str = "default", base: Optional[nn.Module] = None) -> TaskVector:
    """The update that adapter ``adapter_name`` of ``peft_model`` applies, as a task vector on the base model's
    weights: ``{"<module>.weight": delta}`` from each tuner layer's ``get_delta_weight`` (any peft method, ours
    included). ``base`` (optional) is the model the vector will be merged into; its shapes are checked.
    """
    config = peft_model.peft_config.get(adapter_name)
    if config is None:
        raise ValueError(f"the model has no adapter {adapter_name!r}; it has {sorted(peft_model.peft_config)}")
    if getattr(config, "bias", "none") != "none" or getattr(config, "modules_to_save", None):
        raise ValueError(
            f"adapter {adapter_name!r} also trains biases or whole modules (bias / modules_to_save), which have no "
            "delta weight: build its task vector from the merged model instead, "
            "task_vector(base, peft_model.merge_and_unload())"
        )
    vector: TaskVector = {}
    for name, module in peft_model.get_base_model().named_modules():
        holds_adapter = isinstance(module, BaseTunerLayer) and adapter_name in getattr(
            module, module.adapter_layer_names[0], {}
        )
        if holds_adapter:
            base_layer = module.get_base_layer()
            delta = module.get_delta_weight(adapter_name).detach()
            delta = delta.to(base_layer.weight.dtype).reshape(base_layer.weight.shape).clone()
            if not all_finite(delta):
                raise ValueError(
                    f"adapter_task_vector: adapter {adapter_name!r} gives NaN or Inf in the delta weight of layer "
                    f"{name!r} (its factors or scaling are not finite, or the delta overflows the base weight's "
                    f"{delta.dtype}): fix or retrain the adapter"
                )
            vector[f"{name}.weight"] = delta
    if not vector:
        raise ValueError(f"adapter {adapter_name!r} adapts no layer with a delta weight")
    if base is not None:
        check_vectors_fit(base, [vector])
    return vector


def check_vectors_fit(base: nn.Module, vectors: list[TaskVector]) -> dict[str, torch.Tensor]:
    """The base's parameters, after checking that every task vector names base parameters of its shape, holds only
    finite values, and that the base parameters it changes are finite. Each failure is a ValueError naming the task
    vector (by index) and the tensor; nothing is modified. Costs one reduction per tensor."""
    if isinstance(vectors, dict):
        raise ValueError(
            "task vectors must come as a list of dicts (one per task); got a single dict: wrap it, [vector]"
        )
    if not vectors:
        raise ValueError("no task vectors to merge: pass at least one")
    params = _parameters(base)
    for index, vector in enumerate(vectors):
        if not isinstance(vector, dict):
            raise ValueError(
                f"task vector {index} is a {type(vector).__name__}, not a dict of tensors "
                "{parameter name: delta}: build it with task_vector() or adapter_task_vector()"
            )
        if not vector:
            raise ValueError(f"task vector {index} is empty")
        for name, delta in vector.items():
            if name not in params:
                raise ValueError(f"task vector {index} names {name!r}, which the base model does not have")
            if not isinstance(delta, torch.Tensor):
                raise ValueError(f"task vector {index} holds a {type(delta).__name__} for {name!r}, not a tensor")
            if delta.shape != params[name].shape:
                raise ValueError(
                    f"task vector {index} holds {name!r} with shape {tuple(delta.shape)}, the base model with "
                    f"{tuple(params[name].shape)}: it comes from another base"
                )
    for index, vector in enumerate(vectors):
        for name, delta in vector.items():
            if not all_finite(delta.detach()):
                raise ValueError(
                    f"task vector {index} holds NaN or Inf in {name!r}: nothing was merged. Rebuild it from a "
                    "finite fine-tune (a diverged fine-tune has no usable task vector), or leave that task out."
                )
    for name in sorted(set().union(*vectors)):
        if not all_finite(params[name].detach()):
            raise ValueError(
                f"the base model holds NaN or Inf in {name!r}, which the task vectors change: nothing was merged. "
                "Fix or reload the base weights."
            )
    return params
