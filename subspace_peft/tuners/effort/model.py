from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..svd_tuner import SVDTuner
from ..targets import Target, pattern_value, weight_matrix
from .config import EffortConfig
from .layer import EffortLayer, create_layer
from .losses import group_losses


class EffortModel(SVDTuner):
    """Creates an Effort model: each targeted weight's r minor singular components train, the rest stays frozen.

    In training mode (``model.train()``) with gradients enabled, a forward hook adds :meth:`subspace_loss` to the
    ``loss`` the wrapped model returns (when it returns one), so transformers' Trainer trains with Effort's
    regularisers and no extra code. When the loss is computed outside the model, add ``model.subspace_loss()``.
    ``unload()`` and ``merge_and_unload()`` remove the hook.
    """

    prefix: str = "effort_"
    method_name = "Effort"
    tuner_layer_cls = EffortLayer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._losses_from_layers = False
        self._loss_hooks = [self.model.register_forward_pre_hook(self._choose_where_losses_are_computed),
                            self.model.register_forward_hook(self._add_subspace_loss)]

    def _rank(self, target: Target, config: EffortConfig) -> int:
        return pattern_value(config.rank_pattern, target.key, config.residual_rank)

    def _check_plan(self, model, config: EffortConfig, plan: dict) -> None:
        for key, planned in plan.items():
            n = min(weight_matrix(planned.target.base).shape)
            if planned.r >= n:
                raise ValueError(
                    f"Effort residual_rank={planned.r} must be smaller than min(d_out, d_in) = {n} of layer '{key}': "
                    f"the top min(d_out, d_in) - residual_rank components stay frozen. Choose residual_rank <= {n - 1} "
                    "(or set rank_pattern for this layer)."
                )

    def _new_module(self, config: EffortConfig, adapter_name, target, planned, layer_kwargs):
        return create_layer(target, adapter_name, **layer_kwargs)

    # -- Effort's regularisers --------------------------------------------------------------------------------------
    def _adapter_losses(self) -> dict[str, dict[str, torch.Tensor]]:
        """Unweighted losses per active adapter; layers of one weight shape and rank are computed in one batch."""
        groups: dict[tuple, list] = {}
        for module in self._effort_layers():
            if not module.disable_adapters:
                for name in module.active_adapters:
                    if name in module.r:
                        inputs = module.loss_inputs(name)
                        key = (name, tuple(inputs.weight.shape), module.r[name], inputs.weight.dtype,
                               inputs.weight.device)
                        groups.setdefault(key, []).append(inputs)
        per_adapter: dict[str, dict[str, torch.Tensor]] = {}
        for (name, *_), layers in groups.items():
            totals = per_adapter.setdefault(name, {})
            for key, value in group_losses(layers).items():
                totals[key] = totals[key] + value if key in totals else value
        return per_adapter

    def subspace_losses(self) -> dict[str, torch.Tensor]:
        """Unweighted ``{"orth": ..., "norm": ...}`` summed over every adapted layer and active adapter."""
        totals: dict[str, torch.Tensor] = {}
        for losses in self._adapter_losses().values():
            for key, value in losses.items():
                totals[key] = totals[key] + value if key in totals else value
        return totals

    def subspace_loss(self) -> torch.Tensor:
        """``orth_weight * L_orth + norm_weight * L_norm`` summed over all adapted layers (zero at init)."""
        total = torch.zeros((), device=next(self.model.parameters()).device)
        for name, losses in self._adapter_losses().items():
            total = total + self._weighted(name, losses)
        return total

    def _weighted(self, adapter: str, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        config = self.peft_config[adapter]
        return config.orth_weight * losses["orth"] + config.norm_weight * losses["norm"]

    def _effort_layers(self) -> list[EffortLayer]:
        return [module for module in self.model.modules() if isinstance(module, EffortLayer)]

    def _choose_where_losses_are_computed(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook: with FSDP2-sharded weights (DTensors outside each layer's forward) the layers compute
        their loss terms inside their own forward; otherwise the post hook computes them batched."""
        training = module.training and torch.is_grad_enabled()
        if not training and not self._losses_from_layers:
            return  # evaluation and generation: nothing to switch, no walk over the modules
        layers = self._effort_layers()
        self._losses_from_layers = training and any(
            isinstance(layer.get_base_layer().weight, DTensor) for layer in layers)
        for layer in layers:
            layer.collect_losses = self._losses_from_layers
            layer.collected_losses = []

    def _collected_loss(self) -> torch.Tensor:
        total = None
        for layer in self._effort_layers():
            for name, losses in layer.collected_losses:
                term = self._weighted(name, losses)
                total = term if total is None else total + term
            layer.collected_losses = []
        return total if total is not None else torch.zeros(())

    def _add_subspace_loss(self, module: nn.Module, args: Any, outputs: Any):
        """Forward hook on the wrapped model (so every PeftModel class, with or without task_type, goes through it)."""
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else None
        if module.training and torch.is_grad_enabled() and isinstance(loss, torch.Tensor):
            extra = self._collected_loss() if self._losses_from_layers else self.subspace_loss()
            outputs["loss"] = loss + extra.to(device=loss.device, dtype=loss.dtype)
        return outputs

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any):
        for hook in self._loss_hooks:
            hook.remove()
        return super()._unload_and_optionally_merge(*args, **kwargs)
