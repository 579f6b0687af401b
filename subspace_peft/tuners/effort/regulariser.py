"""How Effort's regularisers reach the gradient, whoever computes the task loss.

Each adapted layer computes its own weighted term during its forward and ties it to the singular values ``s`` it
multiplies the input with (:class:`AddGradientOf`): the forward value of ``s`` is unchanged, and whenever a backward
pass reaches ``s`` (every loss computed from the model's outputs does: transformers' Trainer, TRL's fused-head losses,
a hand-written ``cross_entropy(logits, labels)``), the term's gradient is added at ``grad_scale``. So the gradient is
that of ``task loss + orth_weight * L_orth + norm_weight * L_norm`` with no change to the loss the caller computes.

Computing the term inside the layer's forward also keeps it right where weights exist only there: FSDP2 (sharded
outside the forward) and gradient checkpointing (recomputed in the backward pass; the term is tied once, in the pass
that builds the graph the backward uses).
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
        means = {} if not self.passes else {prefix + key: float(value) / self.passes for key, value in self.sums.items()}
        self.passes, self.sums = 0, {}
        return means


@dataclass
class RegulariserPass:
    """What the model hands its layers for one training forward pass: each adapter's loss weights, the gradient
    scale, and the log their terms go to. A layer ties each adapter's term once per pass (``tied``)."""

    weights: dict[str, tuple[float, float]]  # adapter -> (orth_weight, norm_weight)
    grad_scale: float
    log: RegulariserLog
    tied: set = field(default_factory=set)  # (id(layer), adapter)

    def tie(self, layer, adapter: str, carrier: torch.Tensor) -> torch.Tensor:
        """``carrier`` with ``layer``'s weighted term for ``adapter`` tied to its gradient, once per pass; again only
        when gradient checkpointing recomputes the layer inside the backward pass (non-reentrant checkpointing
        checks that the recomputation saves what the first pass saved; that recomputed graph is not backpropagated)."""
        if adapter not in self.weights or not torch.is_grad_enabled():
            return carrier  # no_grad first pass of reentrant checkpointing: tied in the recomputation instead
        key = (id(layer), adapter)
        recomputing = torch._C._current_graph_task_id() != -1
        if key in self.tied and not recomputing:
            return carrier  # a layer called twice in one pass: its term counts once
        losses = layer.subspace_losses(adapter)
        orth_weight, norm_weight = self.weights[adapter]
        term = orth_weight * losses["orth"] + norm_weight * losses["norm"]
        if key not in self.tied:
            self.tied.add(key)
            self.log.add({"loss": term, "orth": losses["orth"], "norm": losses["norm"]})
        return AddGradientOf.apply(carrier, term.to(carrier.dtype), self.grad_scale)
def current_pass(layer) -> Optional[RegulariserPass]:
    return getattr(layer, "regulariser_pass", None)
