"""Concrete-mask merging (Tang et al., "Concrete Subspace Learning based Interference Elimination for Multi-task
Model Fusion", 2023): Concrete Task Arithmetic and Concrete AdaMerging, for any model whose forward gives logits.

One mask logit tensor per merged parameter, shared by all tasks. Each step draws a relaxed Bernoulli (Concrete)
mask ``m = sigmoid((logits + log u - log(1 - u)) / T)``, rescales it ``m <- m / mean(m)`` per parameter tensor, and
merges ``theta = theta_0 + sum_i lambda_i (m * tau_i)``. The loss is the entropy of the merged model's predictions
on unlabeled batches of every task (test-time adaptation: no labels are used).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Optional, Sequence

import torch
from torch import nn

from ..checks import SEED_MAX, all_finite, choice, integer, number
from .adaptation import (
    LambdaMerge,
    LogitsFn,
    Plateau,
    check_loss,
    check_stop,
    checked_logits_fns,
    entropy_objective,
    learn_lambdas,
)
from .task_vectors import TaskVector, check_vectors_fit


@dataclass
class ConcreteMergeResult:
    model: nn.Module  # a new model: the base with the merged weights
    lambdas: torch.Tensor  # (tasks,) task-wise or (tasks, merged tensors) layer-wise scaling factors
    entropy: list[float] = field(default_factory=list)  # the training loss per mask step
    masks: Optional[dict[str, torch.Tensor]] = None  # the final masks (mean 1 per tensor), if asked for
    adamerging_entropy: list[float] = field(default_factory=list)  # Concrete AdaMerging: per lambda step after the mask
    mask_logits: Optional[dict[str, torch.Tensor]] = None  # the trained mask logits, with the masks if asked for
    validation: list[tuple[int, list[float]]] = field(default_factory=list)  # (mask step, per-task accuracy)
    best_step: Optional[int] = None  # with validate: the mask step whose logits the merge kept (patience: the best)


def concrete_sample(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """A relaxed Bernoulli sample at ``temperature``; the noise comes from ``generator`` (CPU), so runs repeat."""
    noise = torch.rand(logits.shape, generator=generator, dtype=logits.dtype).to(logits.device)
    noise = noise.clamp(1e-6, 1 - 1e-6)
    return torch.sigmoid((logits + noise.log() - (-noise).log1p()) / temperature)


def _normalised(mask: torch.Tensor) -> torch.Tensor:
    return mask / mask.mean().clamp_min(1e-12)


@torch.no_grad()
def final_masks(
    logits: dict[str, torch.Tensor], how: str, temperature: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """The masks a merge returns from trained ``logits``: one Concrete sample each (``"sample"``, drawn from
    ``generator`` in the logits' order), the mean mask sigmoid(logits) (``"mean"``) or logits > 0 (``"hard"``);
    each rescaled to mean 1."""
    if how == "mean":
        masks = {n: torch.sigmoid(logit) for n, logit in logits.items()}
    elif how == "sample":
        masks = {n: concrete_sample(logit, temperature, generator) for n, logit in logits.items()}
    else:
        masks = {n: (logit > 0).float() for n, logit in logits.items()}
    return {n: _normalised(m.detach()) for n, m in masks.items()}


def _selected(names: Iterable[str], modules: Optional[Sequence[str]]) -> list[str]:
    """The parameter names under ``modules`` (exact module name, dotted suffix, or a regex on the module name)."""
    names = sorted(names)
    if modules is None:
        return names
    chosen = []
    for name in names:
        module = name.rsplit(".", 1)[0]
        if any(
            module == m or module.endswith("." + m) or module.startswith(m + ".") or re.fullmatch(m, module)
            for m in modules
        ):
            chosen.append(name)
    if not chosen:
        raise ValueError(f"modules={list(modules)!r} matched no parameter the task vectors change")
    return chosen


def concrete_merge(
    base: nn.Module,
    task_vectors: list[TaskVector],
    unlabeled: Sequence[Iterable[Any]],
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
    final_mask: Literal["sample", "mean", "hard"] = "sample",
    return_masks: bool = False,
    progress: bool = True,
    stop: Optional[Plateau] = None,
    adamerging_stop: Optional[Plateau] = None,
    inner_lambda_lr: Optional[float] = None,
    validate: Optional[Callable[[nn.Module], Sequence[float]]] = None,
    validate_every: int = 200,
    patience: Optional[int] = None,
) -> ConcreteMergeResult:
    """Merge ``task_vectors`` into ``base`` through a learned Concrete mask; returns a new model.

    Args:
        base: the pretrained model the task vectors were taken from (not modified).
        task_vectors: one per task (:func:`task_vector` or :func:`adapter_task_vector`).
        unlabeled: per task, the unlabeled batches (dicts for ``model(**batch)``), pass after pass: a list repeats
            in order, a ``torch.utils.data.DataLoader(..., shuffle=True)`` reshuffles every pass as FusionBench's
            loaders do (batches of 16 in its text runs).
        logits_fns: per task, ``fn(model, batch) -> logits`` (e.g. applying that task's own head to the merged
            encoder's output); default ``model(**batch).logits``.
        method: ``"task_arithmetic"`` (Concrete TA: lambda fixed at ``scaling``) or ``"adamerging"`` (Concrete
            AdaMerging: each mask step first takes an inner Adam step on lambda (``inner_lambda_lr``) with the mask
            detached, lambda restarting from ``scaling``; after the ``steps`` mask steps lambda is learned for
            ``adamerging_steps`` (default ``steps``) with the final mask fixed).
        lambda_granularity: AdaMerging's lambda per task (``"task"``) or per task and parameter tensor (``"layer"``).
        steps, lr: mask steps (at most, with ``stop``) and the Adam learning rate of the mask logits.
        temperature: of the Concrete distribution. initial_logits: the logits' start (0: keep probability 1/2).
        seed: seeds the Concrete noise (and a ``"sample"`` final mask): the same seed gives the same merge.
        modules: mask only the parameters of these modules (module names, dotted suffixes or regexes); the other
            changed parameters are merged with plain (AdaMerging: learned-lambda) task arithmetic.
        final_mask: the mask of the returned model. ``"sample"`` (default, FusionBench's ``eval_mask_type:
            continuous``) draws one seeded Concrete mask at ``temperature``, a mask of the kind the training
            optimised; ``"mean"`` uses ``sigmoid(logits)``, deterministic, but a mask the training never sampled
            (at learned logits it is far smoother than any sample); ``"hard"`` keeps entries with positive logits.
            Every mask is rescaled to mean 1 per tensor.
        return_masks: also return the final masks and the trained mask logits (``mask_logits``).
        stop, adamerging_stop: a :class:`Plateau` that ends the mask training (``stop``), or Concrete AdaMerging's
            lambda training after it (``adamerging_stop``), once its entropy stops falling (None: every step runs).
            FusionBench runs 2,000 mask steps (Concrete AdaMerging: 1,000, then 1,000 lambda steps).
        inner_lambda_lr: Concrete AdaMerging's learning rate of the inner lambda step (None: ``lambda_lr``);
            FusionBench's ``base_lr`` is 1: at 1e-3 lambda barely leaves ``scaling`` within the inner step.
        validate: ``fn(model) -> per-task accuracies`` on a small labelled validation split (None: no labels are
            used). Called every ``validate_every`` mask steps and after the last, on the model the merge would
            return then (the final mask drawn with the same seed each time); ``result.validation`` holds (step,
            accuracies) per call. patience: early stopping on those accuracies (needs ``validate``): the training
            ends after ``patience`` validations without a better mean, and the merge keeps the mask logits of the
            best one (``result.best_step``); None: every step runs and the last logits are kept.
            :func:`choose_scaling` picks ``scaling`` on the same split.

    Checked before anything is copied or computed, each failure a ValueError naming the argument and the fix:
    ``scaling`` and ``initial_logits`` finite (within float32's range), ``lr``, ``lambda_lr``, ``inner_lambda_lr`` (or
    None) and ``temperature`` finite and > 0, ``steps`` an integer >= 1, ``adamerging_steps`` None or an integer >= 0,
    ``seed`` an integer >= 0, ``stop`` and ``adamerging_stop`` None or a :class:`Plateau`, the task vectors and the
    base parameters they change finite (naming the task vector and the tensor). A non-finite prediction entropy stops
    the merge at that step, and a merged value that overflows the parameter's dtype is refused; the base model is
    never modified.

    Memory: the masked parameters (N of them) cost 16 bytes each for the duration of the merge (fp32 logits, their
    gradient and Adam's two moments) plus about 12 bytes each per step for the sampled mask, the merged weights and
    their gradient; the task vectors hold 4 bytes per changed parameter and task (Concrete TA 4 more per changed
    parameter for the fixed lambda-weighted sum). Restrict ``modules`` to bound N.
    """
    where = "concrete_merge"
    choice(where, "method", method, ("task_arithmetic", "adamerging"))
    choice(where, "lambda_granularity", lambda_granularity, ("task", "layer"))
    if final_mask == "expectation":
        raise ValueError(f"{where}: final_mask='expectation' is now called 'mean' (sigmoid of the logits)")
    choice(where, "final_mask", final_mask, ("sample", "mean", "hard"))
    if validate is not None and not callable(validate):
        raise ValueError(f"{where}: validate must be None or a function model -> per-task accuracies")
    validate_every = integer(where, "validate_every", validate_every, "pass e.g. validate_every=200", low=1)
    if patience is not None:
        patience = integer(where, "patience", patience, "pass e.g. patience=3 validations, or None", low=1)
        if validate is None:
            raise ValueError(f"{where}: patience needs validate (a function model -> per-task accuracies)")
    scaling = number(where, "scaling", scaling, "pass e.g. scaling=0.3 (the task vectors' weight lambda)", fp32=True)
    steps = integer(where, "steps", steps, "pass e.g. steps=200 (for no mask at all, use task_arithmetic)", low=1)
    lr = number(where, "lr", lr, "pass e.g. lr=1e-3 (the mask logits' Adam learning rate)", low=0.0, low_open=True)
    lambda_lr = number(
        where,
        "lambda_lr",
        lambda_lr,
        "pass e.g. lambda_lr=1e-3 (AdaMerging's Adam learning rate)",
        low=0.0,
        low_open=True,
    )
    if inner_lambda_lr is not None:
        inner_lambda_lr = number(
            where,
            "inner_lambda_lr",
            inner_lambda_lr,
            "pass e.g. inner_lambda_lr=1.0 (FusionBench's base_lr), or None for lambda_lr",
            low=0.0,
            low_open=True,
        )
    inner_lambda_lr = lambda_lr if inner_lambda_lr is None else inner_lambda_lr
    if adamerging_steps is not None:
        adamerging_steps = integer(
            where,
            "adamerging_steps",
            adamerging_steps,
            "pass e.g. adamerging_steps=200, or None for as many as steps",
            low=0,
        )
    temperature = number(
        where,
        "temperature",
        temperature,
        "pass e.g. temperature=0.5 (the Concrete distribution's; lower is closer to a hard mask)",
        low=0.0,
        low_open=True,
    )
    initial_logits = number(
        where,
        "initial_logits",
        initial_logits,
        "pass e.g. initial_logits=0.0 (keep probability sigmoid(initial_logits) = 1/2)",
        fp32=True,
    )
    seed = integer(where, "seed", seed, "pass e.g. seed=0", low=0, high=SEED_MAX)
    check_stop(where, "stop", stop)
    check_stop(where, "adamerging_stop", adamerging_stop)
    params = check_vectors_fit(base, task_vectors)
    logits_fns = checked_logits_fns(where, unlabeled, logits_fns, len(task_vectors))

    merger = _Merger(
        params,
        task_vectors,
        _selected(set().union(*task_vectors), modules),
        initial_logits,
        scaling,
        method,
        lambda_granularity,
    )
    loss_of = entropy_objective(base, unlabeled, logits_fns)
    generator = torch.Generator().manual_seed(seed)
    mask_optimizer = torch.optim.Adam(list(merger.logits.values()), lr=lr)
    lambda_optimizer = torch.optim.Adam([merger.lambdas], lr=inner_lambda_lr) if method == "adamerging" else None
    history = []
    checkpoint = _BestMask(base, merger, validate, final_mask, temperature, seed + 1, len(task_vectors))
    from tqdm.auto import tqdm

    for _ in tqdm(range(steps), desc=f"Concrete {method}", disable=not progress):
        masks = merger.sample(temperature, generator)
        if lambda_optimizer is not None:  # inner step: lambda from its start, mask detached
            with torch.no_grad():
                merger.lambdas.copy_(merger.initial_lambdas)
            lambda_optimizer.zero_grad()
            inner = loss_of(merger.merged({n: m.detach() for n, m in masks.items()}))
            check_loss(
                where, inner, len(history) + 1, "mask step (inner lambda step)", f"inner_lambda_lr={inner_lambda_lr}"
            )
            inner.backward()
            lambda_optimizer.step()
        mask_optimizer.zero_grad()
        loss = loss_of(merger.merged(masks, lambdas=merger.lambdas.detach()))
        check_loss(where, loss, len(history) + 1, "mask step", f"lr={lr}, temperature={temperature}, scaling={scaling}")
        loss.backward()
        mask_optimizer.step()
        history.append(float(loss.detach()))
        if stop is not None and stop.reached(history):
            break
        if validate is not None and len(history) % validate_every == 0:
            if checkpoint.validate(len(history)) and patience is not None and checkpoint.stale >= patience:
                break

    if validate is not None:
        checkpoint.finish(len(history), keep_best=patience is not None)
    final = final_masks(merger.logits, final_mask, temperature, torch.Generator().manual_seed(seed + 1))
    lambda_history = []
    if lambda_optimizer is not None:
        with torch.no_grad():
            merger.lambdas.copy_(merger.initial_lambdas)
        lambda_history = learn_lambdas(
            merger.lambdas,
            lambda: loss_of(merger.merged(final)),
            steps if adamerging_steps is None else adamerging_steps,
            lambda_lr,
            where,
            adamerging_stop,
            progress,
        )
    merged = copy.deepcopy(base)
    merger.copy_merged_into(merged, final, check="concrete_merge")
    return ConcreteMergeResult(
        model=merged,
        lambdas=merger.lambdas.detach().clone(),
        entropy=history,
        masks={n: m.clone() for n, m in final.items()} if return_masks else None,
        adamerging_entropy=lambda_history,
        mask_logits={n: logit.detach().clone() for n, logit in merger.logits.items()} if return_masks else None,
        validation=checkpoint.history,
        best_step=checkpoint.best_step,
    )


class _BestMask:
    """Early stopping on a labelled validation split: validates the model the merge would return at a step and keeps
    a copy of the mask logits of the best mean accuracy."""

    def __init__(self, base, merger, validate, final_mask, temperature, final_seed, tasks):
        self.base, self.merger, self.fn, self.tasks = base, merger, validate, tasks
        self.final_mask, self.temperature, self.final_seed = final_mask, temperature, final_seed
        self.history: list[tuple[int, list[float]]] = []
        self.best_mean, self.best_step, self.best_logits, self.stale = float("-inf"), None, None, 0
        self.scratch: Optional[nn.Module] = None

    @torch.no_grad()
    def validate(self, step: int) -> bool:
        """Validates at ``step``; True when that was no better than the best so far."""
        generator = torch.Generator().manual_seed(self.final_seed)
        masks = final_masks(self.merger.logits, self.final_mask, self.temperature, generator)
        if self.scratch is None:
            self.scratch = copy.deepcopy(self.base)
        self.merger.copy_merged_into(self.scratch, masks)
        scores = [float(score) for score in self.fn(self.scratch)]
        if len(scores) != self.tasks:
            raise ValueError(f"concrete_merge: validate returned {len(scores)} accuracies for {self.tasks} tasks")
        self.history.append((step, scores))
        mean = sum(scores) / len(scores)
        if mean > self.best_mean:
            self.best_mean, self.best_step, self.stale = mean, step, 0
            self.best_logits = {name: logit.detach().clone() for name, logit in self.merger.logits.items()}
            return False
        self.stale += 1
        return True

    @torch.no_grad()
    def finish(self, step: int, keep_best: bool) -> None:
        """Validates the last step (unless just done); with ``keep_best``, puts the best mask logits back."""
        if not self.history or self.history[-1][0] != step:
            self.validate(step)
        if not keep_best:
            self.best_step = step
            return
        for name, logit in self.merger.logits.items():
            logit.copy_(self.best_logits[name])


class _Merger(LambdaMerge):
    """The trainable state of a Concrete merge: mask logits of the masked tensors and the lambdas."""

    def __init__(self, params, vectors, masked, initial_logits, scaling, method, granularity):
        super().__init__(
            params, vectors, scaling, "task" if method == "task_arithmetic" else granularity, method == "adamerging"
        )
        self.logits = {
            n: torch.full(params[n].shape, float(initial_logits), device=params[n].device, requires_grad=True)
            for n in masked
        }
        # Concrete TA never changes lambda, so each tensor's sum_i lambda_i tau_i is formed once, not every step
        self.fixed_updates: Optional[dict[str, torch.Tensor]] = {} if method == "task_arithmetic" else None

    def sample(self, temperature: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {n: _normalised(concrete_sample(logit, temperature, generator)) for n, logit in self.logits.items()}

    @torch.no_grad()
    def copy_merged_into(self, model: nn.Module, masks: dict[str, torch.Tensor], check: Optional[str] = None) -> None:
        """Writes the merge at ``masks`` and the current lambdas into ``model``'s parameters (a copy of the base);
        ``check``: first refuse, naming ``check``, a value that is NaN or Inf in the parameter's dtype."""
        params = dict(model.named_parameters())
        values = {
            name: value.to(params[name].dtype)
            for name, value in self.merged(masks, lambdas=self.lambdas.detach()).items()
        }
        unfinite = [name for name, value in values.items() if check and not all_finite(value)]
        if unfinite:
            raise ValueError(
                f"{check}: the merged value of {unfinite[0]!r} is NaN or Inf in {values[unfinite[0]].dtype} (lambdas "
                f"{self.lambdas.detach().flatten()[:8].tolist()}): lower scaling or lambda_lr"
            )
        for name, value in values.items():
            params[name].copy_(value)

    def update(self, index: int, name: str, lambdas: torch.Tensor) -> torch.Tensor:
        if self.fixed_updates is None:
            return self.weighted_sum(index, name, lambdas)
        if name not in self.fixed_updates:
            self.fixed_updates[name] = self.weighted_sum(index, name, lambdas).detach()
        return self.fixed_updates[name]
