"""Test-time adaptation shared by AdaMerging and the Concrete merges: the merged model's prediction entropy on
unlabeled batches of every task as the loss (Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task
Learning", ICLR 2024: entropy minimisation as the surrogate objective), the forward pass with merged parameters, the
Adam loop that learns the merging coefficients lambda, and a plateau rule that ends a loop once the entropy stops
falling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call

from ..checks import integer, number

LogitsFn = Callable[[Callable[..., Any], Any], torch.Tensor]
Objective = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def default_logits(model: Callable[..., Any], batch: Any) -> torch.Tensor:
    """``model(**batch).logits`` (or the output itself if it is a tensor)."""
    output = model(**batch) if isinstance(batch, dict) else model(batch)
    return output if isinstance(output, torch.Tensor) else output.logits


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over predictions of ``-sum_c p_c log p_c``, with ``p = softmax(logits)`` over the last dimension."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


class MergedForward:
    """Calls the base model's forward with merged parameters (``torch.func.functional_call``): the base is never
    modified, gradients reach whatever the merged parameters were computed from (mask logits, lambdas)."""

    def __init__(self, base: nn.Module, params: dict[str, torch.Tensor]):
        self.base, self.params = base, params

    def __call__(self, *args, **kwargs):
        return functional_call(self.base, self.params, args, kwargs)


@dataclass(frozen=True)
class Plateau:
    """Ends a training loop once the entropy stops falling: checked every ``window`` steps from ``2 * window`` on, it
    stops when the mean entropy of the last ``window`` steps lies less than ``min_drop`` (a share, 0.01 = 1%) below
    the mean of the ``window`` steps before them. The means smooth out the step-to-step noise of batches and samples;
    checking once per window, not every step, keeps that noise from stopping a loop that still falls."""

    window: int = 100
    min_drop: float = 0.01

    def __post_init__(self):
        integer("Plateau", "window", self.window, "pass e.g. window=100 (steps per mean)", low=1)
        number(
            "Plateau",
            "min_drop",
            self.min_drop,
            "pass e.g. min_drop=0.01 (stop once the mean entropy falls by less than 1% per window)",
            low=0.0,
            high=1.0,
            high_open=True,
        )

    def reached(self, history: Sequence[float]) -> bool:
        if len(history) < 2 * self.window or len(history) % self.window:
            return False
        last = sum(history[-self.window :]) / self.window
        before = sum(history[-2 * self.window : -self.window]) / self.window
        return last > (1.0 - self.min_drop) * before


def check_stop(where: str, name: str, stop: Optional[Plateau]) -> None:
    if stop is not None and not isinstance(stop, Plateau):
        raise ValueError(
            f"{where}: {name} must be None or a Plateau, got {stop!r}; pass e.g. "
            f"{name}=Plateau(window=100, min_drop=0.01)"
        )


def checked_logits_fns(
    where: str, unlabeled: Sequence[Sequence[Any]], logits_fns: Optional[Sequence[LogitsFn]], tasks: int
) -> list[LogitsFn]:
    """Unlabeled batches for every task and one logits function per task (default ``model(**batch).logits``)."""
    if len(unlabeled) != tasks or any(len(batches) == 0 for batches in unlabeled):
        raise ValueError(
            f"{where} needs unlabeled batches for every task: got {len(unlabeled)} lists (empty ones: "
            f"{[i for i, b in enumerate(unlabeled) if len(b) == 0]}) for {tasks} task vectors"
        )
    logits_fns = list(logits_fns) if logits_fns is not None else [default_logits] * tasks
    if len(logits_fns) != tasks:
        raise ValueError(f"got {len(logits_fns)} logits_fns for {tasks} task vectors")
    return logits_fns


def passes(batches: Iterable[Any]) -> Iterator[Any]:
    """``batches`` again and again, iterated anew on every pass: a list repeats in order, a ``DataLoader(...,
    shuffle=True)`` reshuffles and re-batches its examples each pass (as the references' loaders do)."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:  # a one-shot iterator would otherwise spin here for ever
            raise ValueError(
                "a task's unlabeled batches gave nothing on a new pass: pass a list of batches or a DataLoader, "
                "which can be iterated again, not a one-shot iterator"
            )


def entropy_objective(base: nn.Module, unlabeled: Sequence[Iterable[Any]], logits_fns: Sequence[LogitsFn]) -> Objective:
    """``loss(merged params)``: the sum over tasks of the prediction entropy on that task's next unlabeled batch
    (each task's batches pass after pass, see :func:`passes`)."""
    batches = [passes(b) for b in unlabeled]

    def loss(merged_params: dict[str, torch.Tensor]) -> torch.Tensor:
        forward = MergedForward(base, merged_params)
        return sum(prediction_entropy(fn(forward, next(it))) for fn, it in zip(logits_fns, batches))

    return loss


def check_loss(where: str, loss: torch.Tensor, step: int, what: str, knobs: str) -> None:
    """Stop at the first non-finite entropy: every later step would only spread NaN through the mask or lambdas."""
    if not torch.isfinite(loss.detach()).all():
        raise ValueError(
            f"{where}: the prediction entropy is {float(loss.detach())} at {what} {step} ({knobs}): lower the "
            "learning rate or raise temperature, and check that logits_fns give finite logits on the unlabeled "
            "batches. The base model is unchanged."
        )


def learn_lambdas(
    lambdas: torch.Tensor,
    loss_of_lambdas: Callable[[], torch.Tensor],
    steps: int,
    lr: float,
    where: str,
    stop: Optional[Plateau] = None,
    progress: bool = True,
) -> list[float]:
    """AdaMerging's loop: up to ``steps`` Adam steps (``lr``) on ``lambdas`` (a leaf tensor with grad), each
    minimising ``loss_of_lambdas()``; returns the entropy of every step taken (``stop`` may end the loop early)."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.Adam([lambdas], lr=lr)
    history: list[float] = []
    for step in tqdm(range(steps), desc="AdaMerging", disable=not progress):
        optimizer.zero_grad()
        loss = loss_of_lambdas()
        check_loss(where, loss, step + 1, "AdaMerging step", f"lambda_lr={lr}")
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
        if stop is not None and stop.reached(history):
            break
    return history


class LambdaMerge:
    """``theta_0 + sum_i lambda_i tau_i`` for every tensor some task vector changes, with trainable lambdas: one per
    task (``granularity="task"``, shape ``(tasks,)``) or one per task and tensor (``"layer"``, shape
    ``(tasks, len(names))``, columns in the order of ``names``), all starting at ``scaling``."""

    def __init__(self, params, vectors, scaling: float, granularity: str, learned: bool = True):
        self.params = params
        self.names = sorted(set().union(*vectors))
        self.vectors = [{n: v[n].float() for n in v} for v in vectors]
        shape = (len(vectors),) if granularity == "task" else (len(vectors), len(self.names))
        self.initial_lambdas = torch.full(shape, float(scaling))
        self.lambdas = self.initial_lambdas.clone().requires_grad_(learned)

    def weighted_sum(self, index: int, name: str, lambdas: torch.Tensor) -> torch.Tensor:
        """``sum_i lambda_i tau_i`` of one tensor (tasks whose vector lacks it contribute nothing)."""
        update = None
        for task, vector in enumerate(self.vectors):
            if name in vector:
                weight = lambdas[task] if lambdas.ndim == 1 else lambdas[task, index]
                term = weight * vector[name]
                update = term if update is None else update + term
        return update

    def update(self, index: int, name: str, lambdas: torch.Tensor) -> torch.Tensor:
        return self.weighted_sum(index, name, lambdas)

    def merged(
        self, masks: Optional[dict[str, torch.Tensor]] = None, lambdas: Optional[torch.Tensor] = None
    ) -> dict[str, torch.Tensor]:
        """``theta_0 + sum_i lambda_i (m * tau_i)`` for every changed tensor (no mask, or a tensor it lacks: m = 1)."""
        lambdas = self.lambdas if lambdas is None else lambdas
        merged = {}
        for index, name in enumerate(self.names):
            update = self.update(index, name, lambdas)
            if masks is not None and name in masks:
                update = masks[name] * update
            merged[name] = self.params[name].detach().float() + update
        return merged

    def scaled_vectors(self) -> list[dict[str, torch.Tensor]]:
        """Each task vector times its current lambdas (per tensor when layer-wise), detached."""
        lambdas = self.lambdas.detach()
        return [
            {
                name: (lambdas[task] if lambdas.ndim == 1 else lambdas[task, index]) * vector[name]
                for index, name in enumerate(self.names)
                if name in vector
            }
            for task, vector in enumerate(self.vectors)
        ]
