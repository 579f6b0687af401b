"""subspace_peft.merging: task vectors, task arithmetic / TIES / DARE, Concrete Task Arithmetic and AdaMerging."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from subspace_peft import PiSSAConfig, merging

from parity import rel_err
from tiny_models import build, inputs, perturbed_copy


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(6, 16), nn.Linear(16, 16)

    def forward(self, x):
        return torch.tanh(self.lin1(torch.tanh(self.lin0(x))))


def fine_tune(base, seed: int, scale: float = 0.05):
    """A 'fine-tune': the base moved by a small seeded perturbation."""
    return perturbed_copy(base, seed, scale)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    base = Encoder()
    tuned = [fine_tune(base, seed) for seed in (1, 2, 3)]
    heads = [nn.Linear(16, classes) for classes in (3, 4, 2)]
    generator = torch.Generator().manual_seed(5)
    unlabeled = [[{"x": torch.randn(8, 6, generator=generator)} for _ in range(2)] for _ in heads]
    logits_fns = [lambda model, batch, head=head: head(model(**batch)) for head in heads]
    return base, tuned, heads, unlabeled, logits_fns


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_params(a: nn.Module, b: nn.Module, tol: float = 0.0) -> bool:
    return all(
        rel_err(p, q) <= tol if tol else torch.equal(p, q)
        for p, q in zip(a.state_dict().values(), b.state_dict().values())
    )


def test_task_vector_is_the_difference_and_inputs_stay_unchanged(setup):
    base, tuned, *_ = setup
    before, before_tuned = state(base), state(tuned[0])
    vector = merging.task_vector(base, tuned[0])
    assert set(vector) == {"lin0.weight", "lin0.bias", "lin1.weight", "lin1.bias"}
    assert torch.equal(vector["lin0.weight"], tuned[0].lin0.weight - base.lin0.weight)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert all(torch.equal(v, before_tuned[k]) for k, v in tuned[0].state_dict().items())


def test_task_arithmetic_of_one_vector_at_lambda_one_is_that_model_and_lambda_zero_the_base(setup):
    base, tuned, *_ = setup
    vectors = [merging.task_vector(base, t) for t in tuned]
    assert same_params(merging.task_arithmetic(base, vectors[:1], scaling=1.0), tuned[0], tol=1e-7)
    assert same_params(merging.task_arithmetic(base, vectors, scaling=0.0), base)
    expected = base.lin0.weight + 0.3 * sum(v["lin0.weight"] for v in vectors)
    assert rel_err(merging.task_arithmetic(base, vectors, 0.3).lin0.weight, expected) <= 1e-6


def test_ties_and_dare(setup):
    base, tuned, *_ = setup
    vectors = [merging.task_vector(base, t) for t in tuned]
    one = merging.ties_merging(base, vectors[:1], scaling=0.7, density=1.0)  # one task, nothing trimmed: 0.7 tau
    assert rel_err(one.lin1.weight - base.lin1.weight, 0.7 * vectors[0]["lin1.weight"]) <= 1e-6
    trimmed = merging.ties_merging(base, vectors[:1], scaling=1.0, density=0.25)
    kept = (trimmed.lin1.weight - base.lin1.weight) != 0
    assert kept.float().mean().item() == pytest.approx(0.25, abs=0.02)  # top 25% by magnitude per tensor
    no_drop = merging.dare_merging(base, vectors, scaling=0.3, drop_rate=0.0)
    assert same_params(no_drop, merging.task_arithmetic(base, vectors, 0.3), tol=1e-6)
    torch.manual_seed(123)
    first = merging.dare_merging(base, vectors, drop_rate=0.9, seed=4)
    torch.manual_seed(999)
    assert same_params(first, merging.dare_merging(base, vectors, drop_rate=0.9, seed=4))
    assert not same_params(first, merging.dare_merging(base, vectors, drop_rate=0.9, seed=5))


def test_concrete_masks_have_the_parameter_shapes_and_mean_one(setup):
    base, tuned, _, unlabeled, fns = setup
    vectors = [merging.task_vector(base, t) for t in tuned]
    for final in ("sample", "mean", "hard"):
        result = merging.concrete_merge(
            base,
            vectors,
            unlabeled,
            fns,
            steps=3,
            lr=0.1,
            initial_logits=0.5,
            final_mask=final,
            return_masks=True,
            progress=False,
        )
        assert set(result.masks) == set(vectors[0])
        for name, mask in result.masks.items():
            assert mask.shape == vectors[0][name].shape
            assert mask.mean().item() == pytest.approx(1.0, abs=1e-5)


def test_concrete_merge_with_modules_masks_only_those(setup):
    base, tuned, _, unlabeled, fns = setup
    vectors = [merging.task_vector(base, t) for t in tuned]
    result = merging.concrete_merge(
        base, vectors, unlabeled, fns, steps=2, modules=["lin1"], return_masks=True, progress=False
    )
    assert set(result.masks) == {"lin1.weight", "lin1.bias"}
    # unmasked parameters get plain task arithmetic
    plain = merging.task_arithmetic(base, vectors, 0.3)
    assert rel_err(result.model.lin0.weight, plain.lin0.weight) <= 1e-6


def test_same_seed_same_merge_and_the_base_is_untouched(setup):
    base, tuned, heads, unlabeled, fns = setup
    vectors = [merging.task_vector(base, t) for t in tuned]
    before = state(base)
    kwargs = dict(steps=5, lr=0.05, final_mask="sample", progress=False)
    torch.manual_seed(1)
    first = merging.concrete_merge(base, vectors, unlabeled, fns, seed=7, **kwargs).model
    torch.manual_seed(2)
    second = merging.concrete_merge(base, vectors, unlabeled, fns, seed=7, **kwargs).model
    other = merging.concrete_merge(base, vectors, unlabeled, fns, seed=8, **kwargs).model
    assert same_params(first, second)
    assert not same_params(first, other)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


@pytest.mark.parametrize(
    "method, granularity", [("task_arithmetic", "task"), ("adamerging", "task"), ("adamerging", "layer")]
)
def test_entropy_falls_over_the_steps(setup, method, granularity):
    base, tuned, _, unlabeled, fns = setup
    vectors = [
        merging.task_vector(base, t, max_relative_distance=None)
        for t in [fine_tune(base, seed, scale=0.5) for seed in (1, 2, 3)]
    ]
    result = merging.concrete_merge(
        base,
        vectors,
        unlabeled,
        fns,
        method=method,
        lambda_granularity=granularity,
        steps=40,
        lr=0.2,
        lambda_lr=0.05,
        adamerging_steps=10,
        progress=False,
    )
    first, last = sum(result.entropy[:5]) / 5, sum(result.entropy[-5:]) / 5
    assert last < 0.9 * first, (first, last)
    if method == "adamerging":
        expected = (3,) if granularity == "task" else (3, 4)
        assert result.lambdas.shape == expected and not torch.allclose(result.lambdas, torch.full(expected, 0.3))


def test_concrete_task_arithmetic_at_lambda_zero_is_the_base(setup):
    base, tuned, _, unlabeled, fns = setup
    vectors = [merging.task_vector(base, t) for t in tuned]
    result = merging.concrete_merge(base, vectors, unlabeled, fns, scaling=0.0, steps=3, progress=False)
    assert same_params(result.model, base)


def test_adapter_task_vectors_merge_like_merge_and_unload():
    x = inputs("mlp")["x"]
    for config in (
        LoraConfig(r=2, target_modules=["lin0", "lin1"], init_lora_weights=False),
        PiSSAConfig(r=2, target_modules=["lin0", "lin1"]),
    ):
        model = get_peft_model(build("mlp"), config)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        vector = merging.adapter_task_vector(model, base=build("mlp"))
        assert set(vector) == {"lin0.weight", "lin1.weight"}
        merged = merging.task_arithmetic(build("mlp"), [vector], scaling=1.0)
        assert rel_err(merged(x), model(x)) <= 1e-5


@pytest.mark.parametrize("case", ["shapes", "other_base", "empty", "no_unlabeled", "missing_task_data"])
def test_bad_input_raises_and_changes_nothing(setup, case):
    base, tuned, _, unlabeled, fns = setup
    before = state(base)
    vectors = [merging.task_vector(base, t) for t in tuned]
    with pytest.raises(ValueError) as error:
        if case == "shapes":
            wider = nn.Module()
            wider.lin0, wider.lin1 = nn.Linear(6, 16), nn.Linear(16, 8)
            merging.task_vector(base, wider)
        elif case == "other_base":
            torch.manual_seed(42)
            merging.task_vector(base, Encoder())
        elif case == "empty":
            merging.task_arithmetic(base, [])
        elif case == "no_unlabeled":
            merging.concrete_merge(base, vectors, [], fns, progress=False)
        else:
            merging.concrete_merge(base, vectors, [unlabeled[0], [], unlabeled[2]], fns, progress=False)
    message = str(error.value)
    assert {
        "shapes": "lin1.weight",
        "other_base": "does not look like a fine-tune",
        "empty": "at least one",
        "no_unlabeled": "unlabeled batches for every task",
        "missing_task_data": "empty ones: [1]",
    }[case] in message
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_the_default_final_mask_is_a_concrete_sample_drawn_with_the_next_seed(setup):
    """FusionBench's returned model uses a Concrete sample of the trained logits (eval_mask_type: continuous)."""
    base, tuned, _, unlabeled, fns = setup
    vectors = [merging.task_vector(base, t) for t in tuned]
    result = merging.concrete_merge(base, vectors, unlabeled, fns, steps=3, lr=0.1, seed=4, return_masks=True)
    generator = torch.Generator().manual_seed(5)  # one draw per tensor, in the masks' order
    for name, logits in result.mask_logits.items():
        sample = merging.concrete.concrete_sample(logits, 0.5, generator)
        assert rel_err(result.masks[name], sample / sample.mean()) <= 1e-6
    with pytest.raises(ValueError, match="final_mask='expectation' is now called 'mean'"):
        merging.concrete_merge(base, vectors, unlabeled, fns, steps=1, final_mask="expectation", progress=False)


def test_final_masks_rebuild_the_returned_merge_from_its_logits(setup):
    # benchmarks evaluate every final mask of one trained merge through merging.concrete.final_masks
    base, tuned, _, unlabeled, fns = setup
    vectors = [merging.task_vector(base, t) for t in tuned]
    for how in ("sample", "mean", "hard"):
        result = merging.concrete_merge(
            base, vectors, unlabeled, fns, steps=3, lr=0.1, seed=4, final_mask=how, return_masks=True, progress=False
        )
        masks = merging.concrete.final_masks(result.mask_logits, how, 0.5, torch.Generator().manual_seed(5))
        assert masks.keys() == result.masks.keys()
        assert max(rel_err(masks[name], result.masks[name]) for name in masks) <= 1e-6


def test_a_shuffling_data_loader_is_reshuffled_every_pass(setup):
    """unlabeled may be DataLoaders: each pass iterates the loader anew, so shuffle=True reshuffles (a list would
    repeat its batches in order)."""
    from torch.utils.data import DataLoader

    base, tuned, _, _, fns = setup
    vectors = [merging.task_vector(base, t) for t in tuned]
    examples = [{"x": x} for x in torch.randn(12, 6, generator=torch.Generator().manual_seed(0))]
    seen = []

    def recording(fn):
        def logits(model, batch):
            seen.append(batch["x"].clone())
            return fn(model, batch)

        return logits

    loaders = [
        DataLoader(examples, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(i)) for i in range(3)
    ]
    merging.concrete_merge(base, vectors, loaders, [recording(fns[0]), fns[1], fns[2]], steps=6, progress=False)
    first, second = torch.cat(seen[:3]), torch.cat(seen[3:6])  # task 0's two passes over its 12 examples
    assert sorted(first.sum(1).tolist()) == pytest.approx(sorted(second.sum(1).tolist()))  # the same examples
    assert not torch.equal(first, second)  # in another order


def test_validation_keeps_the_best_mask_and_patience_stops_early(setup):
    base, tuned, _, unlabeled, fns = setup
    vectors = [merging.task_vector(base, t) for t in tuned]
    calls = []

    def validate(model):  # best at the 2nd validation (step 4), worse after
        calls.append({k: v.clone() for k, v in model.state_dict().items()})
        return [1.0, 1.0, 1.0] if len(calls) == 2 else [0.5, 0.5, 0.5]

    kwargs = dict(steps=20, lr=0.2, seed=3, return_masks=True, progress=False)
    result = merging.concrete_merge(
        base, vectors, unlabeled, fns, validate=validate, validate_every=2, patience=3, **kwargs
    )
    assert [step for step, _ in result.validation] == [2, 4, 6, 8, 10]  # stopped after 3 validations without gain
    assert result.best_step == 4 and len(result.entropy) == 10
    for name, value in result.model.state_dict().items():  # the returned model is the one validated at step 4
        assert torch.equal(value, calls[1][name]), name
    run_four = merging.concrete_merge(base, vectors, unlabeled, fns, **{**kwargs, "steps": 4})
    for name, logits in run_four.mask_logits.items():
        assert torch.equal(result.mask_logits[name], logits), name
    monitored = merging.concrete_merge(base, vectors, unlabeled, fns, validate=validate, validate_every=3, **kwargs)
    assert [step for step, _ in monitored.validation] == [3, 6, 9, 12, 15, 18, 20]  # without patience: watched only
    assert monitored.best_step == 20 and len(monitored.entropy) == 20
    with pytest.raises(ValueError, match="patience needs validate"):
        merging.concrete_merge(base, vectors, unlabeled, fns, patience=2, **kwargs)
    with pytest.raises(ValueError, match="validate returned 2 accuracies for 3 tasks"):
        merging.concrete_merge(base, vectors, unlabeled, fns, validate=lambda m: [1, 1], **kwargs)


def test_choose_scaling_takes_the_best_mean_on_the_validation_split(setup):
    base, tuned, _, _, _ = setup
    vectors = [merging.task_vector(base, t) for t in tuned]

    def validate(model):  # peaks at lambda 0.4 (read back from the merged weight)
        lam = float(((model.lin0.weight.detach() - base.lin0.weight) / sum(v["lin0.weight"] for v in vectors)).mean())
        return [1 - abs(lam - 0.4), 1.0, 0.0]

    best, scores = merging.choose_scaling(base, vectors, validate)
    assert best == 0.4 and sorted(scores) == pytest.approx([0.1 * i for i in range(1, 11)])
    assert merging.choose_scaling(base, vectors, lambda m: [0.5], grid=[0.7, 0.2])[0] == 0.2  # ties: the smaller
    with pytest.raises(ValueError, match="grid is empty"):
        merging.choose_scaling(base, vectors, validate, grid=[])


def test_one_shot_unlabeled_batches_are_refused_not_spun_on(setup):
    base, tuned, _, unlabeled, fns = setup
    vectors = [merging.task_vector(base, t) for t in tuned]

    class OneShot:  # has a length, but iterates once
        def __init__(self, batches):
            self.batches, self.iterator = batches, iter(batches)

        def __len__(self):
            return len(self.batches)

        def __iter__(self):
            return self.iterator

    with pytest.raises(ValueError, match="gave nothing on a new pass: pass a list of batches or a DataLoader"):
        merging.concrete_merge(base, vectors, [OneShot(b) for b in unlabeled], fns, steps=5, progress=False)
