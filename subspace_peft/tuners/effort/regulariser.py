"""How Effort's regularisers reach the gradient, whoever computes the task loss.

The weighted regulariser is tied to the singular values ``s`` an adapted layer multiplies its input with
(:class:`AddGradientOf`): the forward value of ``s`` is unchanged, and when a backward pass reaches ``s`` (every loss
computed from the model's outputs does: transformers' Trainer, TRL's fused-head losses, a hand-written
``cross_entropy(logits, labels)``), the regulariser's gradient is added at ``grad_scale``. So the gradient is that of
``task loss + orth_weight * L_orth + norm_weight * L_norm`` with no change to the loss the caller computes.

Two ways, per forward pass (:class:`RegulariserPass`):

* batched (the default): the model computes the total before the pass, layers of one shape together, and the first
  layer that runs with gradients ties all of it;
* per layer, where weights exist whole only inside each layer's forward (FSDP2, DeepSpeed ZeRO-3): each layer
  computes and ties its own term there.

Gradient checkpointing: reentrant checkpointing runs the first pass without gradients, so the tie happens in the
recomputation; non-reentrant checkpointing checks that the recomputation saves what the first pass saved, so the
layer that tied in the first pass ties again when recomputed inside the backward pass (that graph is not
backpropagated).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


class AddGradientOf(torch.autograd.Function):
    """``carrier`` unchanged in the forward; in the backward, ``grad_scale`` flows into ``term`` (d total / d term)."""

    @staticmethod
    def forward(ctx, carrier: torch.Tensor, term: torch.Tensor, grad_scale: float) -> torch.Tensor:
        ctx.grad_scale = grad_scale
        ctx.term_dtype, ctx.term_device = term.dtype, term.device
        return carrier.clone()  # r numbers: returning the input itself would make the output an alias of it

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.full((), ctx.grad_scale, dtype=ctx.term_dtype, device=ctx.term_device), None


@dataclass
class RegulariserLog:
    """Sums of the terms the layers computed, for logging; ``passes`` counts the forward passes they came from."""

    passes: int = 0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value.to(self.sums[key].device) if key in self.sums else value

    def pop_means(self, prefix: str) -> dict[str, float]:
        """``{prefix + "loss": mean weighted total per pass, prefix + "orth": ..., prefix + "norm": ...}``, then
        resets; empty when no pass computed the regulariser since the last call."""
        means = (
            {} if not self.passes else {prefix + key: float(value) / self.passes for key, value in self.sums.items()}
        )
        self.passes, self.sums = 0, {}
        return means


@dataclass
class RegulariserPass:
    """What the model hands its layers for one training forward pass: the precomputed weighted ``total`` (batched)
    or, when it is None, each adapter's loss weights for the layers to compute their own terms; the gradient scale;
    the log the per-layer terms go to."""

    weights: dict[str, tuple[float, float]]  # adapter -> (orth_weight, norm_weight)
    grad_scale: float
    log: RegulariserLog
    layer_counts: dict[str, int]  # adapter -> its adapted layers: a layer's own terms count 1 / that in the mean
    total: Optional[torch.Tensor] = None
    tied: set = field(default_factory=set)  # (id(layer), adapter) that tied in this pass

    def tie(self, layer, adapter: str, carrier: torch.Tensor) -> torch.Tensor:
        """``carrier``, with the regulariser tied to its gradient if this layer ties in this pass."""
        if adapter not in self.weights or not torch.is_grad_enabled():
            return carrier  # no_grad first pass of reentrant checkpointing: tied in the recomputation instead
        key = (id(layer), adapter)
        recomputing = torch._C._current_graph_task_id() != -1
        if self.total is not None:
            if self.tied and not (recomputing and key in self.tied):
                return carrier  # the total is tied once per pass, by the first layer that ran
            self.tied.add(key)
            return AddGradientOf.apply(carrier, self.total.to(carrier.dtype), self.grad_scale)
        if key in self.tied and not recomputing:
            return carrier  # a layer called twice in one pass: its term counts once
        losses = {key: value / self.layer_counts[adapter] for key, value in layer.subspace_losses(adapter).items()}
        orth_weight, norm_weight = self.weights[adapter]
        term = orth_weight * losses["orth"] + norm_weight * losses["norm"]
        if key not in self.tied:
            self.tied.add(key)
            self.log.add({"loss": term, "orth": losses["orth"], "norm": losses["norm"]})
        return AddGradientOf.apply(carrier, term.to(carrier.dtype), self.grad_scale)
