"""Every merge method by name, with its parameter schema (as mergekit's method registry): the recipe dispatches and
validates through it, and the README's merging section lists it. Adding a method is one :class:`MergeMethod` here.

    from subspace_peft import merging
    merged = merging.merge("ties", base, vectors, density=0.3).model
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Sequence

from torch import nn

from ..checks import choice, integer, number
from ..registry import Paper
from .adaptive_merging import adamerging
from .baselines import dare_merging, task_arithmetic, ties_merging
from .concrete import concrete_merge
from .task_vectors import TaskVector


@dataclass(frozen=True)
class Parameter:
    """One parameter of a merge method: ``type`` is float, int, str (then ``choices``) or list (of strings);
    ``low``/``high`` bound a number (``*_open``: the bound itself is outside); ``optional``: None is allowed."""

    name: str
    type: type
    default: Any
    help: str
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    choices: Optional[tuple] = None
    optional: bool = False

    def interval(self) -> str:
        low = "(-inf" if self.low is None else ("(" if self.low_open else "[") + f"{self.low:g}"
        high = "inf)" if self.high is None else f"{self.high:g}" + (")" if self.high_open else "]")
        return f"{low}, {high}"

    def fix(self) -> str:
        """How to set it, for an error message."""
        bounded = self.low is not None or self.high is not None
        return (
            f"set {self.name} to {self.help}"
            + (f", in {self.interval()}" if bounded else "")
            + f", e.g. {self.default}"
        )

    def check(self, value, where: str) -> None:
        """``value`` fits the schema (its choices, its range, a non-empty list of strings), else a ValueError
        ``"{where}: {name} must be ..., got ...; fix: ..."`` (:mod:`subspace_peft.checks`' wording)."""
        fix = f"fix: {self.fix()}"
        if self.optional and value is None:
            return
        if self.choices:
            choice(where, self.name, value, self.choices, fix)
        if self.type is int:
            integer(where, self.name, value, fix, low=self.low, high=self.high)
        elif self.type is float:
            number(where, self.name, value, fix, self.low, self.high, self.low_open, self.high_open)
        elif self.type is list and (not value or not all(isinstance(item, str) and item for item in value)):
            raise ValueError(
                f"{where}: {self.name} must be {'null or ' if self.optional else ''}a non-empty list of strings, "
                f"got {value!r}; {fix}"
            )


class Merged(NamedTuple):
    model: nn.Module  # a new model; the inputs are not modified
    masks: Optional[dict] = None  # the Concrete methods' final masks, when asked for


@dataclass(frozen=True)
class MergeMethod:
    """``run(base, vectors, unlabeled, return_masks, **parameters) -> Merged``; ``needs_unlabeled``: it learns
    from each task's unlabeled batches (a list of ``model(**batch)`` inputs per task)."""

    name: str
    title: str
    run: Callable[..., Merged]
    parameters: tuple[Parameter, ...]
    paper: Paper
    needs_unlabeled: bool = False

    def defaults(self) -> dict:
        return {parameter.name: parameter.default for parameter in self.parameters}


SCALING = Parameter("scaling", float, 0.3, "the weight of each task vector")
DENSITY = Parameter("density", float, 0.2, "the share of entries TIES keeps", low=0.0, high=1.0, low_open=True)
DROP_RATE = Parameter("drop_rate", float, 0.9, "the share of entries DARE drops", low=0.0, high=1.0, high_open=True)
SEED = Parameter("seed", int, 0, "the seed of the random drops or the Concrete noise (same seed, same merge)", low=0)
STEPS = Parameter("steps", int, 200, "Concrete mask training steps", low=1)
ADAMERGING_STEPS = Parameter("steps", int, 200, "AdaMerging's lambda training steps (the paper: 500)", low=1)
LR = Parameter("lr", float, 1e-3, "the mask logits' Adam learning rate", low=0.0, low_open=True)
LAMBDA_LR = Parameter("lambda_lr", float, 1e-3, "AdaMerging's Adam learning rate for lambda", low=0.0, low_open=True)
LAMBDA_GRANULARITY = Parameter(
    "lambda_granularity",
    str,
    "task",
    "AdaMerging's lambda per task, or per task and parameter tensor",
    choices=("task", "layer"),
)
TEMPERATURE = Parameter(
    "temperature",
    float,
    0.5,
    "the Concrete distribution's temperature (lower is closer to a hard mask)",
    low=0.0,
    low_open=True,
)
INITIAL_LOGITS = Parameter("initial_logits", float, 0.0, "the mask logits' start (0: keep probability 1/2)")
FINAL_MASK = Parameter(
    "final_mask",
    str,
    "sample",
    "the returned model's mask: a Concrete sample (FusionBench's), sigmoid(logits), or thresholded",
    choices=("sample", "mean", "hard"),
)
MODULES = Parameter(
    "modules",
    list,
    None,
    "the module names (e.g. [query, value]) whose parameters are masked; null masks every changed parameter",
    optional=True,
)


def _task_arithmetic(base, vectors, unlabeled, return_masks, *, scaling) -> Merged:
    return Merged(task_arithmetic(base, vectors, scaling))


def _ties(base, vectors, unlabeled, return_masks, *, scaling, density) -> Merged:
    return Merged(ties_merging(base, vectors, scaling, density))


def _dare(base, vectors, unlabeled, return_masks, *, scaling, drop_rate, seed) -> Merged:
    return Merged(dare_merging(base, vectors, scaling, drop_rate, seed))


def _adamerging(base, vectors, unlabeled, return_masks, **parameters) -> Merged:
    return Merged(adamerging(base, vectors, unlabeled, **parameters).model)


def _concrete(method: str) -> Callable[..., Merged]:
    def run(base, vectors, unlabeled, return_masks, **parameters) -> Merged:
        result = concrete_merge(base, vectors, unlabeled, method=method, return_masks=return_masks, **parameters)
        return Merged(result.model, result.masks)

    return run


_CONCRETE = (SCALING, STEPS, LR, TEMPERATURE, INITIAL_LOGITS, SEED, MODULES, FINAL_MASK)
_CONCRETE_PAPER = Paper(
    "Concrete Subspace Learning based Interference Elimination for Multi-task Model Fusion",
    "Tang et al.",
    2023,
    "https://arxiv.org/abs/2312.06173",
)

MERGE_METHODS: dict[str, MergeMethod] = {
    method.name: method
    for method in (
        MergeMethod(
            "task_arithmetic",
            "Task Arithmetic",
            _task_arithmetic,
            (SCALING,),
            Paper("Editing Models with Task Arithmetic", "Ilharco et al.", 2023, "https://arxiv.org/abs/2212.04089"),
        ),
        MergeMethod(
            "ties",
            "TIES",
            _ties,
            (SCALING, DENSITY),
            Paper(
                "TIES-Merging: Resolving Interference When Merging Models",
                "Yadav et al.",
                2023,
                "https://arxiv.org/abs/2306.01708",
            ),
        ),
        MergeMethod(
            "dare",
            "DARE",
            _dare,
            (SCALING, DROP_RATE, SEED),
            Paper(
                "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch",
                "Yu et al.",
                2024,
                "https://arxiv.org/abs/2311.03099",
            ),
        ),
        MergeMethod(
            "adamerging",
            "AdaMerging",
            _adamerging,
            (SCALING, ADAMERGING_STEPS, LAMBDA_LR, LAMBDA_GRANULARITY),
            Paper(
                "AdaMerging: Adaptive Model Merging for Multi-Task Learning",
                "Yang et al.",
                2024,
                "https://arxiv.org/abs/2310.02575",
            ),
            needs_unlabeled=True,
        ),
        MergeMethod(
            "concrete_task_arithmetic",
            "Concrete Task Arithmetic",
            _concrete("task_arithmetic"),
            _CONCRETE,
            _CONCRETE_PAPER,
            needs_unlabeled=True,
        ),
        MergeMethod(
            "concrete_adamerging",
            "Concrete AdaMerging",
            _concrete("adamerging"),
            _CONCRETE + (LAMBDA_LR, LAMBDA_GRANULARITY),
            _CONCRETE_PAPER,
            needs_unlabeled=True,
        ),
    )
}


def merge_method(name: str) -> MergeMethod:
    """The method called ``name``; a ValueError listing the methods if there is none."""
    if name not in MERGE_METHODS:
        raise ValueError(f"no merge method {name!r}; the methods are {tuple(MERGE_METHODS)}")
    return MERGE_METHODS[name]


def all_parameters() -> tuple[Parameter, ...]:
    """Every method's parameters, each once, in the order the methods list them."""
    return tuple({p.name: p for method in MERGE_METHODS.values() for p in method.parameters}.values())


def merge(
    name: str,
    base: nn.Module,
    vectors: list[TaskVector],
    unlabeled: Optional[Sequence] = None,
    return_masks: bool = False,
    **parameters,
) -> Merged:
    """Merge ``vectors`` into a copy of ``base`` with the method ``name``; parameters not given take the schema's
    defaults. An unknown parameter, or a method that needs unlabeled batches without them, is a ValueError."""
    method = merge_method(name)
    unknown = sorted(set(parameters) - {p.name for p in method.parameters})
    if unknown:
        raise ValueError(
            f"{name} has no parameter(s) {unknown}; its parameters are {[p.name for p in method.parameters]}"
        )
    if method.needs_unlabeled and unlabeled is None:
        raise ValueError(f"{name} needs unlabeled batches for every task: pass unlabeled=[[batch, ...], ...]")
    return method.run(base, vectors, unlabeled, return_masks, **{**method.defaults(), **parameters})
