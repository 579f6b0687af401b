"""Concrete-mask merging (Tang et al., "Concrete Subspace Learning based Interference Elimination for Multi-task
Model Fusion", 2023): Concrete Task Arithmetic and Concrete AdaMerging, for any model whose forward gives logits.

One mask logit tensor per merged parameter, shared by all tasks. Each step draws a relaxed Bernoulli (Concrete)
mask ``m = sigmoid((logits + log u - log(1 - u)) / T)``, rescales it ``m <- m / mean(m)`` per parameter tensor, and
merges ``theta = theta_0 + sum_i lambda_i (m * tau_i)``. The loss is the entropy of the merged model's predictions
on unlabeled batches of every task (test-time adaptation: no labels are used).
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call

from .task_vectors import TaskVector, check_vectors_fit

LogitsFn = Callable[[Callable[..., Any], Any], torch.Tensor]


@dataclass
class ConcreteMergeResult:
    model: nn.Module  # a new model: the base with the merged weights
    lambdas: torch.Tensor  # (tasks,) task-wise or (tasks, merged tensors) layer-wise scaling factors
    entropy: list[float] = field(default_factory=list)  # the training loss per mask step
    masks: Optional[dict[str, torch.Tensor]] = None  # the final masks (mean 1 per tensor), if asked for


def default_logits(model: Callable[..., Any], batch: Any) -> torch.Tensor:
    """``model(**batch).logits`` (or the output itself if it is a tensor)."""
    output = model(**batch) if isinstance(batch, dict) else model(batch)
    return output if isinstance(output, torch.Tensor) else output.logits


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over predictions of ``-sum_c p_c log p_c``, with ``p = softmax(logits)`` over the last dimension."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


def concrete_sample(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """A relaxed Bernoulli sample at ``temperature``; the noise comes from ``generator`` (CPU), so runs repeat."""
    noise = torch.rand(logits.shape, generator=generator, dtype=logits.dtype).to(logits.device)
    noise = noise.clamp(1e-6, 1 - 1e-6)
    return torch.sigmoid((logits + noise.log() - (-noise).log1p()) / temperature)


def _normalised(mask: torch.Tensor) -> torch.Tensor:
    return mask / mask.mean().clamp_min(1e-12)


def _selected(names: Iterable[str], modules: Optional[Sequence[str]]) -> list[str]:
    """The parameter names under ``modules`` (exact module name, dotted suffix, or a regex on the module name)."""
    names = sorted(names)
    if modules is None:
        return names
    chosen = []
    for name in names:
        module = name.rsplit(".", 1)[0]
        if any(module == m or module.endswith("." + m) or module.startswith(m + ".") or re.fullmatch(m, module)
               for m in modules):
            chosen.append(name)
    if not chosen:
        raise ValueError(f"modules={list(modules)!r} matched no parameter the task vectors change")
    return chosen


class _MergedForward:
    """Calls the base model's forward with merged parameters (``torch.func.functional_call``): the base is never
    modified, gradients reach the mask logits and the lambdas."""

    def __init__(self, base: nn.Module, params: dict[str, torch.Tensor]):
        self.base, self.params = base, params

    def __call__(self, *args, **kwargs):
        return functional_call(self.base, self.params, args, kwargs)


def concrete_merge(
    base: nn.Module,
    task_vectors: list[TaskVector],
    unlabeled: Sequence[Sequence[Any]],
    logits_fns: Optional[Sequence[LogitsFn]] = None,
    method: Literal["task_arithmetic", "adamerging"] = "task_arithmetic",
    scaling: float = 0.3,
    lambda_granularity: Literal["task", "layer"] = "task",
    steps: int = 200,
    lr: float = 1e-3,
    lambda_lr: float = 1e-3,
    adamerging_steps: Optional[int] = None,
    temperature: float = 0.5,
    initial_logits: float = 0.0,
    seed: int = 0,
    modules: Optional[Sequence[str]] = None,
    final_mask: Literal["expectation", "sample", "hard"] = "expectation",
    return_masks: bool = False,
    progress: bool = True,
) -> ConcreteMergeResult:
    """Merge ``task_vectors`` into ``base`` through a learned Concrete mask; returns a new model.

    Args:
        base: the pretrained model the task vectors were taken from (not modified).
        task_vectors: one per task (:func:`task_vector` or :func:`adapter_task_vector`).
        unlabeled: per task, a list of unlabeled batches (dicts for ``model(**batch)``), cycled through.
        logits_fns: per task, ``fn(model, batch) -> logits`` (e.g. applying that task's own head to the merged
            encoder's output); default ``model(**batch).logits``.
        method: ``"task_arithmetic"`` (Concrete TA: lambda fixed at ``scaling``) or ``"adamerging"`` (Concrete
            AdaMerging: each mask step first takes an inner Adam step on lambda (``lambda_lr``) with the mask
            detached, lambda restarting from ``scaling``; after the ``steps`` mask steps lambda is learned for
            ``adamerging_steps`` (default ``steps``) with the final mask fixed).
        lambda_granularity: AdaMerging's lambda per task (``"task"``) or per task and parameter tensor (``"layer"``).
        steps, lr: mask steps and the Adam learning rate of the mask logits.
        temperature: of the Concrete distribution. initial_logits: the logits' start (0: keep probability 1/2).
        seed: seeds the Concrete noise (and a ``"sample"`` final mask): the same seed gives the same merge.
        modules: mask only the parameters of these modules (module names, dotted suffixes or regexes); the other
            changed parameters are merged with plain (AdaMerging: learned-lambda) task arithmetic.
        final_mask: the mask of the returned model. ``"expectation"`` (default) uses ``sigmoid(logits)``: it is
            deterministic and the mean of the masks the training sampled, so the merge does not hinge on one
            noise draw. ``"sample"`` draws one seeded Concrete mask as FusionBench does; ``"hard"`` keeps entries
            with positive logits. Every mask is rescaled to mean 1 per tensor.
        return_masks: also return the final masks.

    Memory: the masked parameters (N of them) cost 16 bytes each for the duration of the merge (fp32 logits, their
    gradient and Adam's two moments) plus about 12 bytes each per step for the sampled mask, the merged weights and
    their gradient; the task vectors hold 4 bytes per changed parameter and task (Concrete TA 4 more per changed
    parameter for the fixed lambda-weighted sum). Restrict ``modules`` to bound N.
    """
    params = check_vectors_fit(base, task_vectors)
    if len(unlabeled) != len(task_vectors) or any(len(batches) == 0 for batches in unlabeled):
        raise ValueError(
            f"concrete_merge needs unlabeled batches for every task: got {len(unlabeled)} lists (empty ones: "
            f"{[i for i, b in enumerate(unlabeled) if len(b) == 0]}) for {len(task_vectors)} task vectors"
        )
    logits_fns = list(logits_fns) if logits_fns is not None else [default_logits] * len(task_vectors)
    if len(logits_fns) != len(task_vectors):
        raise ValueError(f"got {len(logits_fns)} logits_fns for {len(task_vectors)} task vectors")
    if method not in ("task_arithmetic", "adamerging"):
        raise ValueError(f"method must be 'task_arithmetic' or 'adamerging', got {method!r}")
    if final_mask not in ("expectation", "sample", "hard"):
        raise ValueError(f"final_mask must be 'expectation', 'sample' or 'hard', got {final_mask!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")

    merger = _Merger(params, task_vectors, _selected(set().union(*task_vectors), modules), initial_logits,
                     scaling, method, lambda_granularity)
    batches = [itertools.cycle(list(b)) for b in unlabeled]

    def loss_of(merged_params):
        forward = _MergedForward(base, merged_params)
        return sum(prediction_entropy(fn(forward, next(it))) for fn, it in zip(logits_fns, batches))

    generator = torch.Generator().manual_seed(seed)
    mask_optimizer = torch.optim.Adam(list(merger.logits.values()), lr=lr)
    lambda_optimizer = torch.optim.Adam([merger.lambdas], lr=lambda_lr) if method == "adamerging" else None
    history = []
    from tqdm.auto import tqdm

    for _ in tqdm(range(steps), desc=f"Concrete {method}", disable=not progress):
        masks = merger.sample(temperature, generator)
        if lambda_optimizer is not None:  # inner step: lambda from its start, mask detached
            with torch.no_grad():
                merger.lambdas.copy_(merger.initial_lambdas)
            lambda_optimizer.zero_grad()
            loss_of(merger.merged({n: m.detach() for n, m in masks.items()})).backward()
            lambda_optimizer.step()
        mask_optimizer.zero_grad()
        loss = loss_of(merger.merged(masks, lambdas=merger.lambdas.detach()))
        loss.backward()
        mask_optimizer.step()
        history.append(float(loss.detach()))

    with torch.no_grad():
        final = merger.final_masks(final_mask, temperature, torch.Generator().manual_seed(seed + 1))
    if lambda_optimizer is not None:
        with torch.no_grad():
            merger.lambdas.copy_(merger.initial_lambdas)
        lambda_optimizer = torch.optim.Adam([merger.lambdas], lr=lambda_lr)
        for _ in tqdm(range(steps if adamerging_steps is None else adamerging_steps), desc="AdaMerging",
                      disable=not progress):
            lambda_optimizer.zero_grad()
            loss_of(merger.merged(final)).backward()
            lambda_optimizer.step()
    with torch.no_grad():
        merged = copy.deepcopy(base)
        merged_params = dict(merged.named_parameters())
        for name, value in merger.merged(final, lambdas=merger.lambdas.detach()).items():
            merged_params[name].copy_(value.to(merged_params[name].dtype))
    return ConcreteMergeResult(
        model=merged, lambdas=merger.lambdas.detach().clone(), entropy=history,
        masks={n: m.clone() for n, m in final.items()} if return_masks else None,
    )


class _Merger:
    """The trainable state of a Concrete merge: mask logits of the masked tensors and the lambdas."""

    def __init__(self, params, vectors, masked, initial_logits, scaling, method, granularity):
        if granularity not in ("task", "layer"):
            raise ValueError(f"lambda_granularity must be 'task' or 'layer', got {granularity!r}")
        self.params = params
        self.names = sorted(set().union(*vectors))
        self.vectors = [{n: v[n].float() for n in v} for v in vectors]
        self.logits = {n: torch.full(params[n].shape, float(initial_logits), device=params[n].device,
                                     requires_grad=True) for n in masked}
        shape = (len(vectors),) if method == "task_arithmetic" or granularity == "task" else (len(vectors), len(self.names))
        self.initial_lambdas = torch.full(shape, float(scaling))
        self.lambdas = self.initial_lambdas.clone().requires_grad_(method == "adamerging")
        # Concrete TA never changes lambda, so each tensor's sum_i lambda_i tau_i is formed once, not every step
        self.fixed_updates: Optional[dict[str, torch.Tensor]] = {} if method == "task_arithmetic" else None

    def sample(self, temperature: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {n: _normalised(concrete_sample(logit, temperature, generator)) for n, logit in self.logits.items()}

    def final_masks(self, how: str, temperature: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if how == "expectation":
            masks = {n: torch.sigmoid(logit) for n, logit in self.logits.items()}
        elif how == "sample":
            masks = {n: concrete_sample(logit, temperature, generator) for n, logit in self.logits.items()}
        else:
            masks = {n: (logit > 0).float() for n, logit in self.logits.items()}
        return {n: _normalised(m.detach()) for n, m in masks.items()}

    def _weighted_sum(self, index: int, name: str, lambdas: torch.Tensor) -> torch.Tensor:
        """``sum_i lambda_i tau_i`` of one tensor (tasks whose vector lacks it contribute nothing)."""
        update = None
        for task, vector in enumerate(self.vectors):
            if name in vector:
                weight = lambdas[task] if lambdas.ndim == 1 else lambdas[task, index]
                term = weight * vector[name]
                update = term if update is None else update + term
        return update

    def merged(self, masks: dict[str, torch.Tensor], lambdas: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """``theta_0 + sum_i lambda_i (m * tau_i)`` for every changed tensor (unmasked ones: m = 1)."""
        lambdas = self.lambdas if lambdas is None else lambdas
        merged = {}
        for index, name in enumerate(self.names):
            if self.fixed_updates is None:
                update = self._weighted_sum(index, name, lambdas)
            else:
                if name not in self.fixed_updates:
                    self.fixed_updates[name] = self._weighted_sum(index, name, lambdas).detach()
                update = self.fixed_updates[name]
            if name in masks:
                update = masks[name] * update
            merged[name] = self.params[name].detach().float() + update
        return merged
