"""Plain AdaMerging (learned task- or layer-wise lambdas, no mask), the Plateau stop rule, and what the Concrete merge
now returns for the benchmark (mask logits, the entropy of its lambda phase)."""

from __future__ import annotations

import math
import types

import pytest
import torch
from test_merging import fine_tune, same_params, setup, state  # noqa: F401  (setup is a fixture)
from torch import nn

from subspace_peft import merging
from subspace_peft.merging import adaptive_merging, baselines

from parity import rel_err


def strong_vectors(base: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Task vectors large enough that the lambdas change the predictions visibly."""
    return [
        merging.task_vector(base, fine_tune(base, seed, scale=0.5), max_relative_distance=None) for seed in (1, 2, 3)
    ]


def entropy_at(base, vectors, lambdas: torch.Tensor, unlabeled, fns) -> float:
    """The AdaMerging loss on each task's first batch, computed through plain task arithmetic with these lambdas."""
    merged = merging.merge_task_vectors(
        base,
        [{n: lam * v for n, v in vector.items()} for lam, vector in zip(lambdas.tolist(), vectors)],
        lambda deltas: torch.stack(deltas).sum(0),
    )
    with torch.no_grad():
        return sum(float(merging.prediction_entropy(fn(merged, batches[0]))) for fn, batches in zip(fns, unlabeled))


def test_the_first_step_moves_each_lambda_against_its_entropy_gradient(setup):
    base, _, _, unlabeled, fns = setup
    vectors = strong_vectors(base)
    result = merging.adamerging(base, vectors, unlabeled, fns, steps=1, lambda_lr=0.01, progress=False)
    # the gradient by central differences, independently of the autograd path
    eps, start = 1e-3, torch.full((3,), 0.3, dtype=torch.float64)
    gradient = []
    for task in range(3):
        up, down = start.clone(), start.clone()
        up[task] += eps
        down[task] -= eps
        gradient.append(
            (entropy_at(base, vectors, up, unlabeled, fns) - entropy_at(base, vectors, down, unlabeled, fns))
            / (2 * eps)
        )
    gradient = torch.tensor(gradient, dtype=torch.float64)
    assert gradient.abs().min() > 1e-3, gradient  # every lambda has a clear downhill direction
    # Adam's first step is lr * sign(gradient) (up to its eps): each lambda moves by 0.01 downhill
    expected = 0.3 - 0.01 * torch.sign(gradient)
    assert torch.allclose(result.lambdas.double(), expected, atol=1e-6), (result.lambdas, gradient)
    assert result.entropy[0] == pytest.approx(entropy_at(base, vectors, start, unlabeled, fns), rel=1e-5)


def test_entropy_falls_and_the_model_is_task_arithmetic_with_the_learned_lambdas(setup):
    base, _, _, unlabeled, fns = setup
    vectors = strong_vectors(base)
    ends = {}
    # measured first-5 -> last-5 mean entropy: task-wise 3.00 -> 2.83 (-6%), layer-wise 3.00 -> 2.66 (-11%)
    for granularity, most in (("task", 0.96), ("layer", 0.92)):
        result = merging.adamerging(
            base, vectors, unlabeled, fns, lambda_granularity=granularity, steps=40, lambda_lr=0.05, progress=False
        )
        first, last = sum(result.entropy[:5]) / 5, sum(result.entropy[-5:]) / 5
        assert len(result.entropy) == 40 and last < most * first, (granularity, first, last)
        ends[granularity] = last
        for index, name in enumerate(result.names):
            weights = result.lambdas if granularity == "task" else result.lambdas[:, index]
            expected = dict(base.named_parameters())[name] + sum(w * v[name] for w, v in zip(weights, vectors))
            assert rel_err(dict(result.model.named_parameters())[name], expected) <= 1e-6, name
    assert ends["layer"] < ends["task"] - 0.1  # more coefficients, lower entropy


def test_task_wise_and_layer_wise_parameter_counts(setup):
    base, tuned, _, unlabeled, fns = setup
    vectors = [merging.task_vector(base, t) for t in tuned]
    del vectors[0]["lin0.bias"], vectors[1]["lin0.bias"], vectors[2]["lin0.bias"]  # no task changes lin0.bias
    del vectors[2]["lin1.weight"]  # one task leaves lin1.weight alone: it is still merged for the others
    names = sorted(set().union(*vectors))
    assert names == ["lin0.weight", "lin1.bias", "lin1.weight"]
    task = merging.adamerging(base, vectors, unlabeled, fns, steps=2, progress=False)
    layer = merging.adamerging(base, vectors, unlabeled, fns, lambda_granularity="layer", steps=2, progress=False)
    # task-wise: one lambda per task; layer-wise: tasks x (tensors some task vector changes)
    assert task.lambdas.shape == (3,) and task.lambdas.numel() == len(vectors)
    assert layer.lambdas.shape == (3, 3) and layer.lambdas.numel() == len(vectors) * len(names)
    assert layer.names == names
    assert torch.equal(layer.model.lin0.bias, base.lin0.bias)  # changed by no task: not merged


def test_same_inputs_same_merge_whatever_the_global_rng_and_the_base_is_untouched(setup):
    base, tuned, _, unlabeled, fns = setup
    vectors = [merging.task_vector(base, t) for t in tuned]
    before = state(base)
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        runs.append(
            merging.adamerging(
                base, vectors, unlabeled, fns, lambda_granularity="layer", steps=5, lambda_lr=0.05, progress=False
            )
        )
    assert torch.equal(runs[0].lambdas, runs[1].lambdas) and runs[0].entropy == runs[1].entropy
    assert same_params(runs[0].model, runs[1].model)
    assert not torch.allclose(runs[0].lambdas, torch.full((3, 4), 0.3))  # it did learn
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


BAD = [
    ("lambda_granularity", ["tensor", None], "lambda_granularity must be one of"),
    ("scaling", [math.nan, math.inf, 1e39, "0.3"], "pass e.g. scaling=0.3"),
    ("steps", [0, -1, 2.5, True], "pass e.g. steps=500"),
    ("lambda_lr", [0.0, -1e-3, math.nan, math.inf], "pass e.g. lambda_lr=1e-3"),
    ("stop", [10, "plateau"], "pass e.g. stop=Plateau(window=100, min_drop=0.01)"),
]


@pytest.mark.parametrize("name, values, fix", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments_raise_before_anything_is_copied_or_computed(setup, monkeypatch, name, values, fix):
    base, tuned, _, unlabeled, fns = setup
    vectors = [merging.task_vector(base, t) for t in tuned]
    before = state(base)

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(adaptive_merging, "LambdaMerge", refuse)
    monkeypatch.setattr(adaptive_merging, "check_vectors_fit", refuse)
    monkeypatch.setattr(baselines, "copy", types.SimpleNamespace(deepcopy=refuse))
    for value in values:
        with pytest.raises(ValueError) as error:
            merging.adamerging(base, vectors, unlabeled, fns, progress=False, **{name: value})
        message = str(error.value)
        assert message.startswith("adamerging: ") and f"{name} must be" in message and repr(value) in message
        assert fix in message, message
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_missing_unlabeled_batches_and_logits_fns_are_refused(setup):
    base, tuned, _, unlabeled, fns = setup
    vectors = [merging.task_vector(base, t) for t in tuned]
    with pytest.raises(ValueError, match=r"adamerging needs unlabeled batches for every task.*empty ones: \[1\]"):
        merging.adamerging(base, vectors, [unlabeled[0], [], unlabeled[2]], fns, progress=False)
    with pytest.raises(ValueError, match="got 2 logits_fns for 3 task vectors"):
        merging.adamerging(base, vectors, unlabeled, fns[:2], progress=False)


def test_the_registry_lists_and_runs_adamerging(setup):
    base, tuned, _, unlabeled, fns = setup
    vectors = [merging.task_vector(base, t) for t in tuned]
    method = merging.MERGE_METHODS["adamerging"]
    assert method.title == "AdaMerging" and method.needs_unlabeled
    assert [p.name for p in method.parameters] == ["scaling", "steps", "lambda_lr", "lambda_granularity"]
    assert method.defaults() == {"scaling": 0.3, "steps": 200, "lambda_lr": 1e-3, "lambda_granularity": "task"}
    assert method.paper.url == "https://arxiv.org/abs/2310.02575" and method.paper.year == 2024
    # the registry's models take model(**batch).logits: wrap the encoder and the first task's head
    head = nn.Linear(16, 3)
    batches = [[{"x": b["x"]} for b in unlabeled[0]]]

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.head = base, head

        def forward(self, x):
            return self.head(self.encoder(x))

    classifier = Classifier()
    vector = [{f"encoder.{n}": v for n, v in vectors[0].items()}]
    by_name = merging.merge("adamerging", classifier, vector, batches, lambda_granularity="layer", steps=4)
    direct = merging.adamerging(classifier, vector, batches, lambda_granularity="layer", steps=4, progress=False)
    assert by_name.masks is None and same_params(by_name.model, direct.model)
    assert not same_params(by_name.model, merging.task_arithmetic(classifier, vector, 0.3))  # the lambdas moved
    with pytest.raises(ValueError, match="adamerging needs unlabeled batches"):
        merging.merge("adamerging", classifier, vector)


def test_plateau_stops_when_a_window_mean_falls_by_less_than_min_drop():
    plateau = merging.Plateau(window=4, min_drop=0.01)
    assert not plateau.reached([1.0] * 7)  # fewer than two windows
    assert plateau.reached([1.0] * 4 + [0.995] * 4)  # fell 0.5% < 1%
    assert not plateau.reached([1.0] * 4 + [0.98] * 4)  # fell 2%
    assert plateau.reached([1.0] * 4 + [1.02] * 4)  # rose
    assert not plateau.reached([1.0] * 4 + [0.995] * 5)  # checked once per window only
    assert not plateau.reached([5.0] * 8 + [1.0] * 4 + [0.98] * 4)  # the last two windows count
    assert plateau.reached([5.0] * 8 + [1.0] * 4 + [0.995] * 4)
    for kwargs, fix in (({"window": 0}, "window=100"), ({"window": 2.5}, "window=100"), ({"min_drop": 1.0}, "0.01")):
        with pytest.raises(ValueError, match=f"Plateau: {next(iter(kwargs))} must be.*{fix}"):
            merging.Plateau(**kwargs)


def test_plateau_ends_the_mask_training_and_the_lambda_training_early(setup):
    base, tuned, _, unlabeled, fns = setup
    vectors = [merging.task_vector(base, t) for t in tuned]
    stop = merging.Plateau(window=4, min_drop=0.01)
    # lambda 0: every mask merges to the base, the entropy repeats with the two batches: flat from the start
    flat = merging.concrete_merge(base, vectors, unlabeled, fns, scaling=0.0, steps=100, stop=stop, progress=False)
    assert len(flat.entropy) == 8
    strong = strong_vectors(base)
    learning = merging.adamerging(base, strong, unlabeled, fns, steps=60, lambda_lr=0.05, stop=stop, progress=False)
    concrete = merging.concrete_merge(
        base,
        strong,
        unlabeled,
        fns,
        method="adamerging",
        steps=2,
        adamerging_steps=60,
        lambda_lr=0.05,
        adamerging_stop=stop,
        progress=False,
    )
    assert len(concrete.entropy) == 2  # stop (the mask's) is None: every mask step runs
    for history in (learning.entropy, concrete.adamerging_entropy):
        assert 8 <= len(history) < 60
        assert stop.reached(history) and not any(stop.reached(history[:n]) for n in range(len(history)))
    for name in ("stop", "adamerging_stop"):
        with pytest.raises(ValueError, match=f"concrete_merge: {name} must be None or a Plateau, got 100"):
            merging.concrete_merge(base, vectors, unlabeled, fns, progress=False, **{name: 100})


def test_concrete_returns_its_mask_logits_and_the_entropy_of_its_lambda_phase(setup):
    base, tuned, _, unlabeled, fns = setup
    vectors = [merging.task_vector(base, t) for t in tuned]
    result = merging.concrete_merge(
        base,
        vectors,
        unlabeled,
        fns,
        method="adamerging",
        steps=3,
        lr=0.1,
        adamerging_steps=5,
        final_mask="mean",
        return_masks=True,
        progress=False,
    )
    assert len(result.entropy) == 3 and len(result.adamerging_entropy) == 5
    for name, logits in result.mask_logits.items():
        expected = torch.sigmoid(logits) / torch.sigmoid(logits).mean()  # the mean mask, rescaled to mean 1
        assert rel_err(result.masks[name], expected) <= 1e-6
        assert (logits != 0).any()  # moved from initial_logits=0
    assert merging.concrete_merge(base, vectors, unlabeled, fns, steps=2, progress=False).mask_logits is None


def test_inner_lambda_lr_defaults_to_lambda_lr_and_is_checked(setup):
    base, tuned, _, unlabeled, fns = setup
    vectors = strong_vectors(base)
    kwargs = dict(method="adamerging", steps=3, lr=0.1, lambda_lr=0.01, adamerging_steps=0, return_masks=True)

    def mask_logits(**extra):
        result = merging.concrete_merge(base, vectors, unlabeled, fns, progress=False, **kwargs, **extra)
        return torch.cat([logit.flatten() for logit in result.mask_logits.values()])

    default = mask_logits()
    assert torch.equal(default, mask_logits(inner_lambda_lr=0.01))
    # FusionBench's base_lr 1: the inner step moves lambda by 1, so the mask sees another merged model
    assert (default - mask_logits(inner_lambda_lr=1.0)).abs().max() > 1e-3
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"inner_lambda_lr must be a finite number > 0.*inner_lambda_lr=1\.0"):
            merging.concrete_merge(base, vectors, unlabeled, fns, progress=False, inner_lambda_lr=bad)
