"""Concrete Task Arithmetic run twice on the same inputs: once in FusionBench's components (its ``MaskModel``, its
``TaskWiseMergedModel`` and its ``entropy_loss``, in the loop of its ``ConcreteTaskArithmeticAlgorithmForCLIP``),
once through ``subspace_peft.merging.concrete_merge``; with the same Concrete noise if asked for.

The noise: FusionBench draws each mask's uniforms with ``torch.rand`` on the global generator (inside torch's
``RelaxedBernoulli.rsample``), one draw per parameter in the module order of its mask model; we draw them with
``torch.rand(..., generator=...)`` in the sorted order of the parameter names. The orders differ, so one shared
generator would not give both the same noise: :class:`NoiseTape` records FusionBench's draws (``torch.rand`` patched
while its loop runs, the values passed through unchanged) and hands each to our ``concrete_sample`` under the name it
was drawn for (``torch.rand`` patched while ours runs). Nothing of either implementation is changed; both sample with
their own formula from the same uniforms.

Used by tests/test_reference_fusionbench.py and benchmarks/bench_concrete_reference.py.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from subspace_peft import merging

INSTALL = 'pip install "fusion-bench==0.2.33"'  # next to torch 2.13, transformers 5.25, peft 0.21: no conflict

# FusionBench's defaults (fusion_bench_config/method/concrete_subspace/clip_concrete_task_arithmetic.yaml), which are
# also concrete_merge's: Adam at lr 1e-3, lambda 0.3 fixed (clamp_weights false), logits from 0, temperature 0.5
LR, SCALING, TEMPERATURE, INITIAL_LOGITS = 1e-3, 0.3, 0.5, 0.0


@dataclass
class Run:
    names: list[str]  # the masked parameters, in the order this implementation holds them
    grads: list[dict[str, torch.Tensor]] = field(default_factory=list)  # the mask logits' gradient at every step
    entropy: list[float] = field(default_factory=list)  # the summed prediction entropy at every step
    logits: dict[str, torch.Tensor] = field(default_factory=dict)  # the trained mask logits
    model: Optional[nn.Module] = None  # the returned merged model
    seconds: float = 0.0


class NoiseTape:
    """``torch.rand`` recorded (:meth:`recording`: FusionBench's draws, as one ``{name: uniforms}`` per mask sample)
    and replayed (:meth:`replaying`: each draw of ours gets the recorded uniforms of the name it is drawn for)."""

    def __init__(self):
        self.draws: list[torch.Tensor] = []
        self.samples: list[dict[str, torch.Tensor]] = []

    @contextlib.contextmanager
    def recording(self):
        real = torch.rand

        def rand(*args, **kwargs):
            out = real(*args, **kwargs)
            self.draws.append(out.detach().clone())
            return out

        torch.rand = rand
        try:
            yield self
        finally:
            torch.rand = real

    def split(self, names: Sequence[str]) -> list[dict[str, torch.Tensor]]:
        """The recorded draws as mask samples: every ``len(names)`` draws are one sample, in ``names``' order."""
        if len(self.draws) % len(names):
            raise AssertionError(f"{len(self.draws)} draws is no whole number of samples of {len(names)} tensors")
        self.samples = [
            dict(zip(names, self.draws[start : start + len(names)])) for start in range(0, len(self.draws), len(names))
        ]
        return self.samples

    @contextlib.contextmanager
    def replaying(self, names: Sequence[str], samples: Optional[Sequence[dict[str, torch.Tensor]]] = None):
        """Our draws, in ``names``' order per sample, get ``samples``' uniforms; all of them must be used."""
        queue = [(sample[name], name) for sample in (self.samples if samples is None else samples) for name in names]
        queue.reverse()
        real = torch.rand

        def rand(size, *args, generator=None, dtype=None, **kwargs):
            if not queue:
                raise AssertionError("more draws than FusionBench made")
            noise, name = queue.pop()
            if tuple(noise.shape) != tuple(size):
                raise AssertionError(f"draw for {name!r}: shape {tuple(size)}, recorded {tuple(noise.shape)}")
            return noise.to(dtype or noise.dtype).clone()

        torch.rand = rand
        try:
            yield
        finally:
            torch.rand = real
        if queue:
            raise AssertionError(f"{len(queue)} recorded draws left unused")


def recording_adam(grads: list[dict[str, torch.Tensor]], names: Sequence[str]) -> type:
    """torch.optim.Adam that keeps the gradient of its parameters (named ``names``, in order) at every step."""
    base = torch.optim.Adam

    class RecordingAdam(base):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            grads.append({name: p.grad.detach().clone() for name, p in zip(names, params)})
            return super().step(closure)

    return RecordingAdam


def fusionbench_run(
    base: nn.Module,
    tuned: Sequence[nn.Module],
    heads: Sequence[nn.Module],
    batches: Sequence[Sequence[torch.Tensor]],
    steps: int,
    tape: Optional[NoiseTape] = None,
    final_mask: Optional[Callable[[object], dict]] = None,
    record_grads: bool = True,
) -> Run:
    """FusionBench's Concrete Task Arithmetic: the loop of ``ConcreteTaskArithmeticAlgorithmForCLIP.train_mask`` and
    the final merge of its ``run`` on its own components, with ``heads[i](merged(x))`` as the task's logits (its
    ``compute_logits``) and each task's batches cycled in order (its shuffled test loader). ``tape`` records the
    noise of the training samples and of the final sample; ``final_mask(mask_model)`` replaces the final sample;
    ``record_grads=False`` keeps no gradients (for timing)."""
    from fusion_bench.method.adamerging.entropy_loss import entropy_loss
    from fusion_bench.models.masks import MaskModel
    from fusion_bench.models.wrappers.task_wise_fusion import TaskWiseMergedModel, get_task_wise_weights

    pretrained = copy.deepcopy(base)  # FusionBench turns the fine-tunes into task vectors and merges in place
    finetuned = [copy.deepcopy(t) for t in tuned]
    start = time.perf_counter()
    mask_model = MaskModel(pretrained, ignore_untrained_params=True, parameter_type="logits")
    mask_model.fill_(INITIAL_LOGITS)
    module = TaskWiseMergedModel(
        task_wise_weight=get_task_wise_weights(num_models=len(finetuned), init_values=SCALING),
        pretrained_model=pretrained,
        finetuned_models=finetuned,
        clamp_weights=False,
        tie_weights=True,
        strict=False,
    )
    names = [name for name, _ in mask_model.named_parameters()]
    run = Run(names=names)
    adam = recording_adam(run.grads, names) if record_grads else torch.optim.Adam
    optimizer = adam([p for p in mask_model.parameters() if p.requires_grad], lr=LR)
    module.requires_grad_(False)
    mask_model.train()
    loaders = [itertools.cycle(task_batches) for task_batches in batches]
    with tape.recording() if tape is not None else contextlib.nullcontext():
        for _ in range(steps):
            mask = mask_model.sample_mask(mask_type="continuous", temperature=TEMPERATURE)
            for name, m in mask.items():
                mask[name] = m / torch.mean(m)
            module.merge_weights(task_vector_mask=mask)
            total = None
            for head, loader in zip(heads, loaders):
                loss = entropy_loss(head(module(next(loader))))
                total = loss if total is None else total + loss
            total.backward()
            optimizer.step()
            optimizer.zero_grad()
            run.entropy.append(float(total.detach()))
        with torch.no_grad():
            if final_mask is None:
                mask = mask_model.sample_mask(mask_type="continuous", temperature=TEMPERATURE)
            else:
                mask = final_mask(mask_model)
            for name, m in mask.items():
                mask[name] = m / torch.mean(m)
            run.model = module.merge_and_unload(mask).to(dtype=torch.float32)
    run.seconds = time.perf_counter() - start
    run.logits = {name: p.detach().clone() for name, p in mask_model.named_parameters()}
    if tape is not None:
        tape.split(names)
    return run


class Body(nn.Module):
    """The merged model: what the tasks share (Linear, tanh, LayerNorm, Linear). Each task's head stays outside it,
    as CLIP's text heads do in FusionBench."""

    def __init__(self, inputs: int = 8, hidden: int = 32, features: int = 16):
        super().__init__()
        self.lin0, self.norm, self.lin1 = nn.Linear(inputs, hidden), nn.LayerNorm(hidden), nn.Linear(hidden, features)

    def forward(self, x):
        return self.lin1(self.norm(torch.tanh(self.lin0(x))))


def fine_tune(base: Body, task: int, classes: int, steps: int = 30) -> tuple[Body, nn.Linear]:
    """SGD steps of the body and a fresh head on a seeded synthetic task (labels from a random linear teacher)."""
    inputs, features = base.lin0.in_features, base.lin1.out_features
    generator = torch.Generator().manual_seed(100 + task)
    teacher = torch.randn(inputs, classes, generator=generator)
    body = copy.deepcopy(base)
    torch.manual_seed(200 + task)
    head = nn.Linear(features, classes)
    optimizer = torch.optim.SGD([*body.parameters(), *head.parameters()], lr=0.1)
    for _ in range(steps):
        x = torch.randn(64, inputs, generator=generator)
        loss = nn.functional.cross_entropy(head(body(x)), (x @ teacher).argmax(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return body.requires_grad_(False), head.requires_grad_(False)


def tiny_tasks(
    inputs: int = 8, hidden: int = 32, features: int = 16, classes: Sequence[int] = (3, 4, 5), batch: int = 32
):
    """A base body, one fine-tune and head per task, and two unlabelled batches per task; all seeded (the global
    generator is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = Body(inputs, hidden, features)
        tuned, heads = zip(*(fine_tune(base, task, n) for task, n in enumerate(classes)))
    generator = torch.Generator().manual_seed(5)
    batches = [[torch.randn(batch, inputs, generator=generator) for _ in range(2)] for _ in heads]
    return base, list(tuned), list(heads), batches


def logits_fns(heads: Sequence[nn.Module]) -> list:
    return [lambda model, x, head=head: head(model(x)) for head in heads]


def ours_run(
    base: nn.Module,
    tuned: Sequence[nn.Module],
    heads: Sequence[nn.Module],
    batches: Sequence[Sequence[torch.Tensor]],
    steps: int,
    tape: Optional[NoiseTape] = None,
    final_mask: str = "sample",
    seed: int = 0,
    record_grads: bool = True,
) -> Run:
    """``concrete_merge`` with FusionBench's settings; ``tape`` (recorded from :func:`fusionbench_run`) gives it
    FusionBench's noise, the final sample's included (``final_mask="sample"``); ``record_grads=False`` keeps no
    gradients (for timing)."""
    start = time.perf_counter()
    vectors = [merging.task_vector(base, t) for t in tuned]
    names = sorted(set().union(*vectors))  # concrete_merge holds (and samples) its logits in sorted order
    run = Run(names=names)
    real_adam = torch.optim.Adam
    if record_grads:
        torch.optim.Adam = recording_adam(run.grads, names)
    try:
        replay = contextlib.nullcontext()
        if tape is not None:
            samples = tape.samples if final_mask == "sample" else tape.samples[:steps]
            replay = tape.replaying(names, samples)
        with replay:
            result = merging.concrete_merge(
                base,
                vectors,
                batches,
                logits_fns(heads),
                scaling=SCALING,
                steps=steps,
                lr=LR,
                temperature=TEMPERATURE,
                initial_logits=INITIAL_LOGITS,
                seed=seed,
                final_mask=final_mask,
                return_masks=True,
                progress=False,
            )
        run.seconds = time.perf_counter() - start
    finally:
        torch.optim.Adam = real_adam
    run.entropy, run.logits, run.model = result.entropy, result.mask_logits, result.model
    if list(result.mask_logits) != names:
        raise AssertionError(f"concrete_merge holds its logits as {list(result.mask_logits)}, not sorted")
    return run


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference over the tensors of two dicts with the same names."""
    if set(a) != set(b):
        raise AssertionError(f"different names: {sorted(set(a) ^ set(b))}")
    return max(float((a[n].double() - b[n].double()).abs().max()) for n in a)
