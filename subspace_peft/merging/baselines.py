"""The merges users compare against: task arithmetic, TIES and DARE, on task vectors (per parameter tensor, with
peft.utils.merge_utils doing the per-tensor work). Each returns a new model; the base is never modified.

Every knob is checked before anything is copied: ``scaling`` a finite number (negative subtracts the task vectors:
task negation), TIES' ``density`` in (0, 1], DARE's ``drop_rate`` in [0, 1), ``seed`` an integer. Task vectors and the
base parameters they change must be finite; a merge whose result overflows the parameter's dtype is refused too.
Each refusal is a ValueError naming the parameter (and the task vector, by index) and leaves the base untouched.
"""

from __future__ import annotations

import copy
from typing import Callable, Literal, Sequence

import torch
from peft.utils import merge_utils
from torch import nn

from ..checks import SEED_MAX, all_finite, choice, integer, number
from .task_vectors import TaskVector, check_vectors_fit

_SCALING_FIX = "pass e.g. scaling=0.3 (negative values subtract the task vectors)"


@torch.no_grad()
def merge_task_vectors(
    base: nn.Module, vectors: list[TaskVector], combine: Callable[[list[torch.Tensor]], torch.Tensor]
) -> nn.Module:
    """A copy of ``base`` with ``combine(deltas)`` added to each parameter some task vector names (a task vector that
    does not name a parameter contributes zeros there). The task vectors and the base parameters they change must be
    finite, and so must the merged values (else a ValueError naming the parameter; ``base`` is never modified)."""
    check_vectors_fit(base, vectors)
    merged = copy.deepcopy(base)
    params = dict(merged.named_parameters())
    for name in sorted(set().union(*vectors)):
        param = params[name]
        deltas = [
            v[name].to(torch.float32) if name in v else torch.zeros_like(param, dtype=torch.float32) for v in vectors
        ]
        update = combine(deltas).to(param.dtype)
        if not all_finite(update) or not all_finite(param.add_(update)):
            raise ValueError(
                f"the merged value of {name!r} overflows {param.dtype} (NaN or Inf) although the task vectors and the "
                "base are finite: lower scaling (for DARE, also drop_rate: kept entries grow by 1 / (1 - drop_rate))"
            )
    return merged


def _weights(count: int, scaling: float) -> torch.Tensor:
    return torch.full((count,), float(scaling))


def task_arithmetic(base: nn.Module, vectors: list[TaskVector], scaling: float = 0.3) -> nn.Module:
    """``theta_0 + scaling * sum_i tau_i`` (Ilharco et al., 2023). ``scaling``: a finite number."""
    scaling = number("task_arithmetic", "scaling", scaling, _SCALING_FIX, fp32=True)
    return merge_task_vectors(
        base, vectors, lambda deltas: merge_utils.task_arithmetic(deltas, _weights(len(deltas), scaling))
    )


SCALING_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # Ilharco et al.'s grid, without 0.05's


def choose_scaling(
    base: nn.Module,
    vectors: list[TaskVector],
    validate: Callable[[nn.Module], Sequence[float]],
    grid: Sequence[float] = SCALING_GRID,
) -> tuple[float, dict[float, list[float]]]:
    """The task-arithmetic ``scaling`` (lambda) with the best mean of ``validate(model)`` (per-task accuracies on a
    small labelled validation split) over ``grid``, as task arithmetic's and Concrete TA's papers choose it; returns
    it and every value's accuracies. Ties go to the smaller value."""
    if not callable(validate):
        raise ValueError("choose_scaling: validate must be a function model -> per-task accuracies")
    if len(grid) == 0:
        raise ValueError("choose_scaling: grid is empty; pass e.g. grid=(0.1, 0.2, ..., 1.0)")
    grid = [number("choose_scaling", "grid", value, _SCALING_FIX, fp32=True) for value in grid]
    scores = {value: [float(s) for s in validate(task_arithmetic(base, vectors, value))] for value in grid}
    best = max(grid, key=lambda value: (sum(scores[value]) / len(scores[value]), -value))
    return best, scores


def ties_merging(
    base: nn.Module,
    vectors: list[TaskVector],
    scaling: float = 1.0,
    density: float = 0.2,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> nn.Module:
    """TIES (Yadav et al., 2023): keep each task vector's top ``density`` share of entries by magnitude (per
    parameter tensor), elect a sign per entry, average the entries that agree with it, scale by ``scaling``.
    ``density`` lies in (0, 1] (1 keeps every entry; a tensor where ``density`` keeps no entry is not merged)."""
    scaling = number("ties_merging", "scaling", scaling, "pass e.g. scaling=1.0", fp32=True)
    density = number(
        "ties_merging",
        "density",
        density,
        "pass the share of each task vector's entries to keep, e.g. density=0.2",
        low=0.0,
        high=1.0,
        low_open=True,
    )
    choice("ties_merging", "majority_sign_method", majority_sign_method, ("total", "frequency"))
    return merge_task_vectors(
        base,
        vectors,
        lambda deltas: merge_utils.ties(deltas, _weights(len(deltas), scaling), density, majority_sign_method),
    )


def dare_merging(
    base: nn.Module,
    vectors: list[TaskVector],
    scaling: float = 0.3,
    drop_rate: float = 0.9,
    seed: int = 0,
    use_ties: bool = False,
) -> nn.Module:
    """DARE (Yu et al., 2024): drop each task-vector entry with probability ``drop_rate`` (in [0, 1)) and rescale the
    rest by ``1 / (1 - drop_rate)``, then task arithmetic (or TIES' sign election with ``use_ties``). Seeded: the
    same ``seed`` (an integer) gives the same merge whatever the global RNG state."""
    scaling = number("dare_merging", "scaling", scaling, _SCALING_FIX, fp32=True)
    drop_rate = number(
        "dare_merging",
        "drop_rate",
        drop_rate,
        "pass the probability of dropping an entry, e.g. drop_rate=0.9 (1 would drop everything)",
        low=0.0,
        high=1.0,
        high_open=True,
    )
    seed = integer("dare_merging", "seed", seed, "pass e.g. seed=0", low=0, high=SEED_MAX)
    choice("dare_merging", "use_ties", use_ties, (False, True))
    density = 1.0 - drop_rate
    method = merge_utils.dare_ties if use_ties else merge_utils.dare_linear
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return merge_task_vectors(base, vectors, lambda deltas: method(deltas, _weights(len(deltas), scaling), density))
