"""AdaMerging (Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024): task arithmetic
whose merging coefficients are learned, with no mask.

Task-wise AdaMerging learns one coefficient per task, ``theta = theta_0 + sum_i lambda_i tau_i``; layer-wise
AdaMerging one per task and parameter tensor l, ``theta^l = theta_0^l + sum_i lambda_i^l tau_i^l``. The lambdas
start at ``scaling`` (the paper's 0.3) and Adam minimises the entropy of the merged model's predictions on unlabeled
batches of every task (test-time adaptation: no labels are used). It is Concrete AdaMerging without the mask
(:func:`~subspace_peft.merging.concrete_merge` with ``method="adamerging"``): comparing the two isolates the mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence

import torch
from torch import nn

from ..checks import choice, integer, number
from .adaptation import (
    LambdaMerge,
    LogitsFn,
    Plateau,
    check_stop,
    checked_logits_fns,
    entropy_objective,
    learn_lambdas,
)
from .baselines import merge_task_vectors
from .task_vectors import TaskVector, check_vectors_fit


@dataclass
class AdaMergingResult:
    model: nn.Module  # a new model: the base with the merged weights
    lambdas: torch.Tensor  # (tasks,) task-wise, or (tasks, len(names)) layer-wise
    names: list[str]  # the merged parameter tensors (every one some task vector changes), sorted: the lambda columns
    entropy: list[float] = field(default_factory=list)  # the training loss per lambda step


def adamerging(
    base: nn.Module,
    task_vectors: list[TaskVector],
    unlabeled: Sequence[Sequence[Any]],
    logits_fns: Optional[Sequence[LogitsFn]] = None,
    lambda_granularity: Literal["task", "layer"] = "task",
    scaling: float = 0.3,
    steps: int = 200,
    lambda_lr: float = 1e-3,
    stop: Optional[Plateau] = None,
    progress: bool = True,
) -> AdaMergingResult:
    """Merge ``task_vectors`` into ``base`` with learned coefficients; returns a new model.

    Args:
        base: the pretrained model the task vectors were taken from (not modified).
        task_vectors: one per task (:func:`task_vector` or :func:`adapter_task_vector`).
        unlabeled: per task, a list of unlabeled batches (dicts for ``model(**batch)``), cycled through in order.
        logits_fns: per task, ``fn(model, batch) -> logits``; default ``model(**batch).logits``.
        lambda_granularity: ``"task"`` (one lambda per task: ``tasks`` numbers) or ``"layer"`` (one per task and
            changed parameter tensor: ``tasks * len(names)`` numbers).
        scaling: every lambda's start (the paper's 0.3). Lambdas are not clamped (FusionBench's default).
        steps, lambda_lr: Adam steps (at most, with ``stop``) and learning rate (the paper: 500 steps at 1e-3).
        stop: a :class:`Plateau` ends the training once the entropy stops falling (None: every step runs).

    Nothing is drawn at random, so the same inputs give the same merge. Checked before anything is copied or
    computed, each failure a ValueError naming the argument and the fix: ``lambda_granularity`` one of "task",
    "layer"; ``scaling`` finite (within float32's range); ``steps`` an integer >= 1; ``lambda_lr`` finite and > 0;
    ``stop`` None or a :class:`Plateau`; the task vectors and the base parameters they change finite; unlabeled
    batches and a logits function for every task. A non-finite entropy stops the merge at that step, a merged value
    that overflows the parameter's dtype is refused; the base model is never modified.
    """
    where = "adamerging"
    choice(where, "lambda_granularity", lambda_granularity, ("task", "layer"))
    scaling = number(where, "scaling", scaling, "pass e.g. scaling=0.3 (the lambdas' start)", fp32=True)
    steps = integer(where, "steps", steps, "pass e.g. steps=500 (the paper's lambda steps)", low=1)
    lambda_lr = number(
        where,
        "lambda_lr",
        lambda_lr,
        "pass e.g. lambda_lr=1e-3 (the lambdas' Adam learning rate)",
        low=0.0,
        low_open=True,
    )
    check_stop(where, "stop", stop)
    params = check_vectors_fit(base, task_vectors)
    logits_fns = checked_logits_fns(where, unlabeled, logits_fns, len(task_vectors))

    merge = LambdaMerge(params, task_vectors, scaling, lambda_granularity)
    loss_of = entropy_objective(base, unlabeled, logits_fns)
    history = learn_lambdas(merge.lambdas, lambda: loss_of(merge.merged()), steps, lambda_lr, where, stop, progress)
    model = merge_task_vectors(base, merge.scaled_vectors(), lambda deltas: torch.stack(deltas).sum(0))
    return AdaMergingResult(model=model, lambdas=merge.lambdas.detach().clone(), names=merge.names, entropy=history)
