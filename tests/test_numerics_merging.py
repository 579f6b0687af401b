"""Numeric input to merging and spectrum: every knob is finite and in range, task vectors and the base parameters
they change are finite, merged values that overflow are refused, an all-zero layer has a defined spectrum. Each
refusal is a ValueError naming the parameter (and the task vector or layer) and leaves the base model bit for bit
unchanged; merges refuse before they copy the base."""

from __future__ import annotations

import copy
import math
import types

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_merging import Encoder
from torch import nn

import subspace_peft
from subspace_peft import checks as _checks
from subspace_peft import merging
from subspace_peft.merging import baselines, concrete

from tiny_models import build


def fine_tune(base: nn.Module, seed: int) -> nn.Module:
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return tuned


def bits(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the state dict as raw bytes: NaN compares equal to itself, -0.0 differs from 0.0."""
    return {k: v.detach().clone().reshape(-1).view(torch.uint8) for k, v in model.state_dict().items()}


def same_bits(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = bits(model)
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    base = Encoder()
    vectors = [merging.task_vector(base, fine_tune(base, seed)) for seed in (1, 2)]
    heads = [nn.Linear(16, classes) for classes in (3, 2)]
    generator = torch.Generator().manual_seed(5)
    unlabeled = [[{"x": torch.randn(4, 6, generator=generator)}] for _ in heads]
    logits_fns = [lambda model, batch, head=head: head(model(**batch)) for head in heads]
    return base, vectors, unlabeled, logits_fns


@pytest.fixture
def no_copy(monkeypatch):
    """Merges must refuse before they copy the base: a deepcopy inside baselines/concrete fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the base was copied before the input was refused")

    for module in (baselines, concrete):
        monkeypatch.setattr(module, "copy", types.SimpleNamespace(deepcopy=refuse))


def merge(kind: str, base, vectors, unlabeled, fns, **kwargs):
    if kind == "task_arithmetic":
        return merging.task_arithmetic(base, vectors, **kwargs)
    if kind == "ties":
        return merging.ties_merging(base, vectors, **kwargs)
    if kind == "dare":
        return merging.dare_merging(base, vectors, **kwargs)
    return merging.concrete_merge(base, vectors, unlabeled, fns, steps=kwargs.pop("steps", 2), progress=False, **kwargs)


KNOBS = [
    ("task_arithmetic", "scaling", [math.nan, math.inf, -math.inf, 1e39, "0.3", True, None]),
    ("ties", "scaling", [math.nan, math.inf]),
    ("ties", "density", [0.0, -0.1, 1.5, math.nan, math.inf]),
    ("ties", "majority_sign_method", ["majority", None]),
    ("dare", "scaling", [math.nan, -math.inf]),
    ("dare", "drop_rate", [1.0, -0.1, 1.5, math.nan]),
    ("dare", "seed", [-1, 1.5, True, "0"]),
    ("dare", "use_ties", ["yes"]),
    ("concrete", "scaling", [math.nan, math.inf, -1e39]),
    ("concrete", "steps", [0, -3, 2.5, True]),
    ("concrete", "lr", [0.0, -1e-3, math.nan, math.inf]),
    ("concrete", "lambda_lr", [0.0, math.nan, math.inf]),
    ("concrete", "adamerging_steps", [-1, 1.5]),
    ("concrete", "temperature", [0.0, -0.5, math.nan, math.inf]),
    ("concrete", "initial_logits", [math.nan, math.inf, 1e300]),
    ("concrete", "seed", [-1, 0.5]),
    ("concrete", "method", ["ties"]),
    ("concrete", "final_mask", ["soft"]),
    ("concrete", "lambda_granularity", ["tensor"]),
]


@pytest.mark.parametrize("kind, name, values", KNOBS, ids=[f"{k}-{n}" for k, n, _ in KNOBS])
def test_every_knob_is_checked_before_the_base_is_touched(setup, no_copy, kind, name, values):
    base, vectors, unlabeled, fns = setup
    before = bits(base)
    for value in values:
        with pytest.raises(ValueError) as error:
            merge(kind, base, vectors, unlabeled, fns, **{name: value})
        message = str(error.value)
        assert f"{name} must be" in message and repr(value) in message, message
        assert "\n" not in message
        if name not in ("method", "final_mask", "lambda_granularity", "majority_sign_method", "use_ties"):
            assert "pass e.g." in message or "pass the" in message, message  # the fix
        assert same_bits(base, before)


def test_in_range_knobs_still_merge(setup):
    base, vectors, unlabeled, fns = setup
    merging.task_arithmetic(base, vectors, scaling=-1.0)  # task negation
    merging.ties_merging(base, vectors, density=1e-3)  # keeps no entry of the small tensors: merged as the base
    merging.dare_merging(base, vectors, drop_rate=0.0, seed=2**40)
    merging.concrete_merge(
        base,
        vectors,
        unlabeled,
        fns,
        steps=1,
        adamerging_steps=0,
        method="adamerging",
        initial_logits=-2.0,
        progress=False,
    )


@pytest.mark.parametrize("max_relative_distance", [math.nan, math.inf, 0.0, -0.5])
def test_task_vector_distance_bound_is_checked(setup, max_relative_distance):
    base, *_ = setup
    tuned = fine_tune(base, 1)
    before, before_tuned = bits(base), bits(tuned)
    with pytest.raises(ValueError, match="max_relative_distance must be a finite number > 0"):
        merging.task_vector(base, tuned, max_relative_distance=max_relative_distance)
    assert same_bits(base, before) and same_bits(tuned, before_tuned)


KINDS = ["task_arithmetic", "ties", "dare", "concrete"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_task_vector_is_refused_naming_it(setup, no_copy, kind, bad):
    base, vectors, unlabeled, fns = setup
    vectors = [dict(v) for v in vectors]
    vectors[1]["lin1.weight"] = vectors[1]["lin1.weight"].clone()
    vectors[1]["lin1.weight"][3, 5] = bad
    before = bits(base)
    with pytest.raises(ValueError) as error:
        merge(kind, base, vectors, unlabeled, fns)
    assert "task vector 1 holds NaN or Inf in 'lin1.weight'" in str(error.value)
    assert same_bits(base, before)


@pytest.mark.parametrize("kind", KINDS)
def test_a_non_finite_base_parameter_that_would_be_merged_is_refused(setup, no_copy, kind):
    base, vectors, unlabeled, fns = setup
    with torch.no_grad():
        base.lin0.bias[2] = math.nan
    before = bits(base)
    with pytest.raises(ValueError) as error:
        merge(kind, base, vectors, unlabeled, fns)
    assert "the base model holds NaN or Inf in 'lin0.bias'" in str(error.value)
    assert same_bits(base, before)  # the NaN itself is kept bit for bit


def test_a_non_finite_base_parameter_no_vector_changes_is_left_alone(setup):
    base, vectors, *_ = setup
    with torch.no_grad():
        base.lin0.bias[2] = math.inf
    only_lin1 = [{k: v for k, v in vector.items() if k.startswith("lin1")} for vector in vectors]
    merged = merging.task_arithmetic(base, only_lin1, 0.3)
    assert torch.equal(merged.lin0.bias, base.lin0.bias)
    assert torch.isfinite(merged.lin1.weight).all()


# scaling within fp32's range, but scaling * tau beyond it
@pytest.mark.parametrize(
    "kind, kwargs",
    [("task_arithmetic", {"scaling": 3e38}), ("dare", {"scaling": 3e38}), ("ties", {"scaling": -3e38, "density": 1.0})],
)
def test_a_merge_that_overflows_is_refused(setup, kind, kwargs):
    base, vectors, unlabeled, fns = setup
    vectors = [dict(v) for v in vectors]
    vectors[0]["lin1.weight"] = vectors[0]["lin1.weight"].clone()
    vectors[0]["lin1.weight"][0, 0] = 10.0
    before = bits(base)
    with pytest.raises(ValueError, match=r"the merged value of 'lin\d\.(weight|bias)' overflows torch.float32"):
        merge(kind, base, vectors, unlabeled, fns, **kwargs)
    assert same_bits(base, before)


def test_concrete_merge_stops_at_a_non_finite_entropy(setup):
    base, vectors, unlabeled, _ = setup
    before = bits(base)
    fns = [lambda model, batch: model(**batch) * math.nan] * 2
    with pytest.raises(ValueError, match=r"prediction entropy is nan at mask step 1 \(lr=0.001"):
        merging.concrete_merge(base, vectors, unlabeled, fns, steps=3, progress=False)
    assert same_bits(base, before)


@pytest.mark.parametrize("culprit", ["base", "fine-tuned"])
def test_task_vector_names_the_model_and_parameter_holding_nan(setup, culprit):
    base, *_ = setup
    tuned = fine_tune(base, 1)
    with torch.no_grad():
        (base if culprit == "base" else tuned).lin1.bias[0] = math.nan
    before, before_tuned = bits(base), bits(tuned)
    with pytest.raises(ValueError, match=f"the {culprit} model holds NaN or Inf in parameter 'lin1.bias'"):
        merging.task_vector(base, tuned)
    assert same_bits(base, before) and same_bits(tuned, before_tuned)


def test_adapter_task_vector_names_the_layer_with_a_non_finite_delta():
    model = get_peft_model(build("mlp"), LoraConfig(r=2, target_modules=["lin0", "lin1"]))
    with torch.no_grad():
        model.base_model.model.lin1.lora_B["default"].weight[0, 0] = math.inf
    with pytest.raises(ValueError, match="adapter 'default' gives NaN or Inf in the delta weight of layer 'lin1'"):
        merging.adapter_task_vector(model)


def test_the_finiteness_check_is_one_reduction_per_finite_tensor(monkeypatch):
    calls = []
    isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: calls.append(t.numel()) or isfinite(t))
    assert _checks.all_finite(torch.randn(256, 256)) and _checks.all_finite(torch.randn(64, 64, dtype=torch.bfloat16))
    assert calls == []  # one sum each (numpy's for CPU fp16/32/64, torch's for bf16), no (256, 256) boolean mask
    huge = torch.full((4,), 3e38)  # finite, but its fp32 sum overflows: checked element-wise
    assert _checks.all_finite(huge) and calls == [4]
    assert not _checks.all_finite(torch.tensor([1.0, math.nan])) and not _checks.all_finite(torch.tensor([-math.inf]))
    assert _checks.all_finite(torch.full((3,), 6e4, dtype=torch.float16))  # fp16 sum accumulated in fp32


# spectrum


class Layers(nn.Module):
    def __init__(self):
        super().__init__()
        self.zero, self.one, self.full = nn.Linear(4, 6, bias=False), nn.Linear(5, 3), nn.Linear(8, 8)
        with torch.no_grad():
            self.zero.weight.zero_()
            self.one.weight.copy_(torch.outer(torch.arange(1.0, 4.0), torch.ones(5)))  # rank 1


def test_an_all_zero_layer_has_rank_zero_and_no_nan():
    model = Layers()
    before = bits(model)
    report = subspace_peft.spectrum(model, ["zero", "one", "full"])
    zero = report.layers["zero"]
    assert zero.total_energy == 0.0 and torch.equal(zero.singular_values, torch.zeros(4))
    assert torch.equal(zero.energy, torch.ones(4, dtype=torch.float64))
    for energy in (1e-9, 0.5, 0.9, 1.0):
        assert zero.rank_for(energy) == 0
    assert [zero.energy_at(r) for r in range(5)] == [1.0] * 5
    assert report.ranks_for(0.9) == {"zero": 0, "one": 1, "full": report.layers["full"].rank_for(0.9)}
    assert report.energy_at(0) == {"zero": 1.0, "one": 0.0, "full": 0.0}
    assert report.energy_at(100)["zero"] == 1.0 and report.energy_at(100)["one"] == pytest.approx(1.0)
    assert "nan" not in report.summary(energy=0.9, rank=2).lower()
    for layer in report.layers.values():  # never a rank above min(d_out, d_in), never NaN
        for energy in (1e-6, 0.5, 0.999999, 1.0):
            assert 0 <= layer.rank_for(energy) <= min(layer.shape)
        assert not torch.isnan(layer.energy).any()
    assert same_bits(model, before)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_weight_is_named(bad):
    model = Layers()
    with torch.no_grad():
        model.one.weight[1, 2] = bad
    before = bits(model)
    with pytest.raises(ValueError, match="layer 'one' has NaN or Inf in its weight"):
        subspace_peft.spectrum(model, ["zero", "one"])
    assert same_bits(model, before)


def test_energy_and_rank_arguments_are_checked():
    report = subspace_peft.spectrum(Layers(), ["one", "zero"])
    layer = report.layers["one"]
    for energy in (0.0, -0.1, 1.5, math.nan, math.inf, True, "0.9"):
        for call in (layer.rank_for, report.ranks_for, lambda e: report.summary(energy=e)):
            with pytest.raises(ValueError, match=r"energy must be a share in \(0, 1\]"):
                call(energy)
        with pytest.raises(ValueError, match="energy must be"):
            report.plot("unused.png", energy=energy)
    for rank in (-1, 1.5, True, "2"):
        for call in (layer.energy_at, report.energy_at, lambda r: report.summary(rank=r)):
            with pytest.raises(ValueError, match="rank must be an integer >= 0"):
                call(rank)
    with pytest.raises(ValueError, match=r"layer 'one': rank must lie in \[0, 3\]"):
        layer.energy_at(4)
