from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ...checks import number
from ..base import SVDTuner, Target, matrix_shape, pattern_value
from .config import EffortConfig
from .layer import EffortLayer
from .losses import group_losses
from .regulariser import RegulariserLog, RegulariserPass


class EffortModel(SVDTuner):
    """Creates an Effort model: each targeted weight's r minor singular components train, the rest stays frozen.

    In training mode (``model.train()``) with gradients enabled, every forward pass ties Effort's weighted
    regularisers to the gradient of whatever loss is computed from the model's outputs (transformers' Trainer, TRL's
    SFTTrainer, a hand-written ``cross_entropy(logits, labels)``): the gradient is that of task loss +
    :meth:`subspace_loss`, and the loss value the caller sees is the task loss alone. With a Trainer, add
    :func:`subspace_peft.add_regulariser_callback` to log the regulariser and count it once per optimizer step under
    gradient accumulation. ``unload()`` and ``merge_and_unload()`` remove the hook.
    """

    prefix: str = "effort_"
    method_name = "Effort"
    tuner_layer_cls = EffortLayer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._regulariser_log = RegulariserLog()
        self._regulariser_every_pass, self._regulariser_step = True, None
        self._regulariser_handed_out = self._warned_no_callback = False
        self._loss_hooks = [self.model.register_forward_pre_hook(self._hand_out_regulariser, with_kwargs=True)]

    def _rank(self, target: Target, config: EffortConfig) -> int:
        return pattern_value(config.rank_pattern, target.key, config.residual_rank)

    def _check_plan(self, model, config: EffortConfig, plan: dict) -> None:
        for key, planned in plan.items():
            n = min(matrix_shape(planned.target.base))
            if planned.r >= n:
                raise ValueError(
                    f"Effort residual_rank={planned.r} must be smaller than min(d_out, d_in) = {n} of layer '{key}': "
                    f"the top min(d_out, d_in) - residual_rank components stay frozen. Choose residual_rank <= {n - 1} "
                    "(or set rank_pattern for this layer)."
                )

    # -- Effort's regularisers --------------------------------------------------------------------------------------
    def _adapter_losses(self, layers: Optional[list[EffortLayer]] = None) -> dict[str, dict[str, torch.Tensor]]:
        """Unweighted losses per active adapter, each the mean of its layers' normalised terms; layers of one weight
        shape and rank are computed in one batch."""
        groups: dict[tuple, list] = {}
        for module in layers if layers is not None else self._effort_layers():
            for name in _adapters_of(module):
                inputs = module.loss_inputs(name)
                key = (name, tuple(inputs.weight.shape), module.r[name], inputs.weight.dtype, inputs.weight.device)
                groups.setdefault(key, []).append(inputs)
        per_adapter: dict[str, dict[str, torch.Tensor]] = {}
        counts: dict[str, int] = {}
        for (name, *_), layers in groups.items():
            totals = per_adapter.setdefault(name, {})
            counts[name] = counts.get(name, 0) + len(layers)
            for key, value in group_losses(layers).items():
                totals[key] = totals[key] + value if key in totals else value
        return {
            name: {key: value / counts[name] for key, value in totals.items()} for name, totals in per_adapter.items()
        }

    def subspace_losses(self) -> dict[str, torch.Tensor]:
        """Unweighted ``{"orth": ..., "norm": ...}``: each the mean over an adapter's layers (see EffortConfig),
        summed over the active adapters."""
        return _summed(self._adapter_losses())

    def subspace_loss(self, per_adapter: Optional[dict] = None) -> torch.Tensor:
        """``orth_weight * L_orth + norm_weight * L_norm``, each loss the mean over the adapted layers (zero at
        init)."""
        total = torch.zeros((), device=next(self.model.parameters()).device)
        for name, losses in (per_adapter if per_adapter is not None else self._adapter_losses()).items():
            total = total + self._weighted(name, losses)
        return total

    def _weighted(self, adapter: str, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        config = self.peft_config[adapter]
        return config.orth_weight * losses["orth"] + config.norm_weight * losses["norm"]

    def _effort_layers(self) -> list[EffortLayer]:
        return [module for module in self.model.modules() if isinstance(module, EffortLayer)]

    # -- the regulariser's gradient, whoever computes the loss (see regulariser.py) ---------------------------------
    def start_optimizer_step(self, grad_scale: float = 1.0) -> None:
        """Count the regulariser once in the optimizer step that starts now: the next training forward pass ties it
        to the gradient (at ``grad_scale``: the loss scale of fp16 mixed precision, else 1), the step's other
        micro-batches do not. :class:`~subspace_peft.RegulariserCallback` calls this at every Trainer step; call it
        yourself in a hand-written loop with gradient accumulation. Until the first call every training pass ties it."""
        number("start_optimizer_step", "grad_scale", grad_scale, "pass the fp16 loss scale, or 1", low=0, low_open=True)
        self._regulariser_every_pass, self._regulariser_step = False, grad_scale

    def regularise_every_pass(self) -> None:
        """Back to the default after :meth:`start_optimizer_step`: every training forward pass ties the regulariser
        at scale 1 (right for loops that step after every backward)."""
        self._regulariser_step = None
        self._regulariser_every_pass = True

    def pop_regulariser_log(self) -> dict[str, float]:
        """Mean ``effort_loss`` (weighted), ``effort_orth`` and ``effort_norm`` (unweighted) per training pass since
        the last call, as the layers computed them; then resets. Empty if no pass computed them."""
        return self._regulariser_log.pop_means("effort_")

    def _hand_out_regulariser(self, module: nn.Module, args: Any, kwargs: dict) -> None:
        """Forward pre-hook on the wrapped model: in a training pass with gradients, every Effort layer gets this
        pass's :class:`RegulariserPass`; otherwise (evaluation, generation, the rest of an optimizer step's
        micro-batches) none."""
        training = module.training and torch.is_grad_enabled()
        due = training and (self._regulariser_every_pass or self._regulariser_step is not None)
        if not due and not self._regulariser_handed_out:
            return  # nothing to clear: no walk over the modules
        if due and self._regulariser_every_pass and "num_items_in_batch" in kwargs and not self._warned_no_callback:
            self._warned_no_callback = True
            warnings.warn(
                "Effort is training under a Trainer without subspace_peft.add_regulariser_callback(trainer): "
                "its regulariser is not logged, and with gradient accumulation it counts once per "
                "micro-batch instead of once per optimizer step",
                stacklevel=2,
            )
        handed = None
        layers = self._effort_layers()
        if due:
            weights = {name: (config.orth_weight, config.norm_weight) for name, config in self.peft_config.items()}
            scale = 1.0 if self._regulariser_every_pass else self._regulariser_step
            handed = RegulariserPass(weights, scale, self._regulariser_log, _layer_counts(layers))
            if not any(_whole_only_in_forward(layer) for layer in layers):
                per_adapter = self._adapter_losses(layers)
                if per_adapter:
                    handed.total = self.subspace_loss(per_adapter)
                    self._regulariser_log.add({"loss": handed.total, **_summed(per_adapter)})
            self._regulariser_log.passes += 1
            if not self._regulariser_every_pass:
                self._regulariser_step = None  # the step's later micro-batches: no regulariser
        for layer in layers:
            layer.regulariser_pass = handed
        self._regulariser_handed_out = handed is not None

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any):
        for hook in self._loss_hooks:
            hook.remove()
        return super()._unload_and_optionally_merge(*args, **kwargs)


def _summed(per_adapter: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    totals: dict[str, torch.Tensor] = {}
    for losses in per_adapter.values():
        for key, value in losses.items():
            totals[key] = totals[key] + value if key in totals else value
    return totals


def _adapters_of(layer: EffortLayer) -> list[str]:
    """The active adapters that have this layer (none while adapters are disabled)."""
    return [] if layer.disable_adapters else [name for name in layer.active_adapters if name in layer.r]


def _layer_counts(layers: list[EffortLayer]) -> dict[str, int]:
    """Per active adapter, how many of ``layers`` it adapts: the losses are means over them."""
    counts: dict[str, int] = {}
    for layer in layers:
        for name in _adapters_of(layer):
            counts[name] = counts.get(name, 0) + 1
    return counts


def _whole_only_in_forward(layer: EffortLayer) -> bool:
    """Whether the layer's weight is whole only inside its forward: sharded by FSDP2 (a DTensor) or partitioned by
    DeepSpeed ZeRO-3 (a parameter with a ``ds_id``)."""
    weight = layer.get_base_layer().weight
    return isinstance(weight, DTensor) or hasattr(weight, "ds_id")
