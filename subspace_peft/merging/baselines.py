"""The merges users compare against: task arithmetic, TIES and DARE, on task vectors (per parameter tensor, with
peft.utils.merge_utils doing the per-tensor work). Each returns a new model; the base is never modified."""

from __future__ import annotations

import copy
from typing import Callable, Literal

import torch
from peft.utils import merge_utils
from torch import nn

from .task_vectors import TaskVector, check_vectors_fit


@torch.no_grad()
def merge_task_vectors(
    base: nn.Module, vectors: list[TaskVector], combine: Callable[[list[torch.Tensor]], torch.Tensor]
) -> nn.Module:
    """A copy of ``base`` with ``combine(deltas)`` added to each parameter some task vector names (a task vector that
    does not name a parameter contributes zeros there)."""
    check_vectors_fit(base, vectors)
    merged = copy.deepcopy(base)
    params = dict(merged.named_parameters())
    for name in sorted(set().union(*vectors)):
        param = params[name]
        deltas = [v[name].to(torch.float32) if name in v else torch.zeros_like(param, dtype=torch.float32)
                  for v in vectors]
        param.add_(combine(deltas).to(param.dtype))
    return merged


def _weights(count: int, scaling: float) -> torch.Tensor:
    return torch.full((count,), float(scaling))


def task_arithmetic(base: nn.Module, vectors: list[TaskVector], scaling: float = 0.3) -> nn.Module:
    """``theta_0 + scaling * sum_i tau_i`` (Ilharco et al., 2023)."""
    return merge_task_vectors(base, vectors, lambda deltas: merge_utils.task_arithmetic(deltas, _weights(len(deltas), scaling)))


def ties_merging(
    base: nn.Module, vectors: list[TaskVector], scaling: float = 1.0, density: float = 0.2,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> nn.Module:
    """TIES (Yadav et al., 2023): keep each task vector's top ``density`` share of entries by magnitude (per
    parameter tensor), elect a sign per entry, average the entries that agree with it, scale by ``scaling``."""
    _check_share("density", density)
    return merge_task_vectors(
        base, vectors,
        lambda deltas: merge_utils.ties(deltas, _weights(len(deltas), scaling), density, majority_sign_method),
    )


def dare_merging(
    base: nn.Module, vectors: list[TaskVector], scaling: float = 0.3, drop_rate: float = 0.9, seed: int = 0,
    use_ties: bool = False,
) -> nn.Module:
    """DARE (Yu et al., 2024): drop each task-vector entry with probability ``drop_rate`` and rescale the rest by
    ``1 / (1 - drop_rate)``, then task arithmetic (or TIES' sign election with ``use_ties``). Seeded: the same
    ``seed`` gives the same merge whatever the global RNG state."""
    _check_share("drop_rate", drop_rate, upper_open=True)
    density = 1.0 - drop_rate
    method = merge_utils.dare_ties if use_ties else merge_utils.dare_linear
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return merge_task_vectors(base, vectors, lambda deltas: method(deltas, _weights(len(deltas), scaling), density))


def _check_share(name: str, value: float, upper_open: bool = False) -> None:
    upper_ok = value < 1.0 if upper_open else value <= 1.0
    if not (0.0 <= value and upper_ok):
        interval = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(f"{name} must lie in {interval}, got {value}")
