"""SVFit-specific checks: the decomposition, energy-chosen ranks, bad input, export rank, adapter size."""

from __future__ import annotations

import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

import subspace_peft
from subspace_peft import SVFitConfig
from subspace_peft.tuners.svfit.layer import SVFitLayer

from parity import assert_refused_unchanged, rel_err
from tiny_models import build, minilm


def svfit_layers(model):
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, SVFitLayer)}


def test_sigma_starts_at_the_top_singular_values_and_the_update_is_u_dsigma_vt():
    base = build("mlp")
    weight = base.lin1.weight.detach().clone()
    model = get_peft_model(base, SVFitConfig(r=6, target_modules=["lin1"]))
    layer = svfit_layers(model)["lin1"]
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    assert rel_err(layer.svfit_sigma0["default"].weight, s[:6]) <= 1e-6
    assert torch.equal(layer.svfit_delta["default"].weight, torch.zeros(6))  # sigma = sigma_0 (1 + delta)
    delta = torch.linspace(0.1, 2.0, 6)  # grown: the trained values stay above the frozen remainder's
    with torch.no_grad():
        layer.svfit_delta["default"].weight.copy_(delta)
    expected = u[:, :6] @ torch.diag(s[:6] * delta) @ vh[:6]
    assert rel_err(layer.get_delta_weight("default"), expected) <= 1e-5
    # W = U_r diag(sigma) V_r^T + W_e: the adapted weight's top-r part carries sigma_0 (1 + delta)
    adapted = weight + layer.get_delta_weight("default")
    trained = (s[:6] * (1 + delta)).sort().values
    assert rel_err(torch.linalg.svdvals(adapted)[:6].sort().values, trained) <= 1e-5


def test_by_default_energy_chooses_the_ranks_and_r_or_energy_overrides_it():
    assert SVFitConfig().energy == 0.99 and SVFitConfig().r is None
    assert SVFitConfig(r=16).energy is None  # an explicit r keeps its meaning
    assert SVFitConfig(energy=0.9).energy == 0.9


def test_one_adam_step_moves_each_singular_value_in_proportion_to_it():
    # the trained parameter is the relative change: Adam's first step (|update| = lr per entry) moves sigma_i by
    # lr * sigma_i, as a weight-scale-aware update should (LoRA's rates then suit SVFit)
    model = get_peft_model(build("mlp"), SVFitConfig(r=6, target_modules=["lin1"]))
    layer = svfit_layers(model)["lin1"]
    sigma0 = layer.svfit_sigma0["default"].weight.detach().clone()
    optimizer = torch.optim.Adam([layer.svfit_delta["default"].weight], lr=1e-2)
    model(torch.randn(4, 10)).pow(2).sum().backward()
    optimizer.step()
    moved = (layer._sigma_change("default").detach().abs() / sigma0).clone()
    assert rel_err(moved, torch.full((6,), 1e-2)) <= 1e-4


def test_energy_picks_the_smallest_rank_holding_that_share_of_sigma_squared():
    base = build("minilm")
    weights = {n: m.weight.detach() for n, m in base.named_modules() if n.endswith(("query", "value"))}
    model = get_peft_model(base, SVFitConfig(energy=0.9, target_modules=["query", "value"]))
    layers = svfit_layers(model)
    assert len(layers) == 12
    for name, layer in layers.items():
        power = torch.linalg.svdvals(weights[name]).double().pow(2)
        share = power.cumsum(0) / power.sum()
        r = layer.r["default"]
        assert share[r - 1] >= 0.9 > share[r - 2], name
        assert layer.svfit_delta["default"].weight.numel() == r


def test_export_is_exactly_rank_r(tmp_path):
    model = get_peft_model(build("mlp"), SVFitConfig(r=4, target_modules=["lin0", "lin1"]))
    with torch.no_grad():
        for layer in svfit_layers(model).values():
            layer.svfit_delta["default"].weight.fill_(0.5)
    config = subspace_peft.export_lora(model, tmp_path)
    assert set(config.rank_pattern.values()) == {4}
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert state["base_model.model.lin0.lora_A.weight"].shape == (4, 10)
    assert state["base_model.model.lin0.lora_B.weight"].shape == (20, 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(energy=0.0, target_modules=["lin0"]), r"energy must be a finite number in \(0, 1\]"),
        (dict(energy=1.2, target_modules=["lin0"]), r"energy must be a finite number in \(0, 1\]"),
        (dict(r=11, target_modules=["lin0"]), r"lin0.*r <= 10"),
        (dict(r=2, target_modules=["lin0"], rank_pattern={"lin0": 0}), r"lin0.*positive"),
    ],
)
def test_bad_input_raises_before_anything_changes(kwargs, message):
    assert_refused_unchanged(build("mlp"), lambda: SVFitConfig(**kwargs), message)


def test_minilm_parameter_count_and_adapter_size_against_lora_r8(tmp_path, capsys):
    targets = ["query", "value"]
    svfit = get_peft_model(minilm(), SVFitConfig(r=32, target_modules=targets))
    lora = get_peft_model(minilm(), LoraConfig(r=8, lora_alpha=8, target_modules=targets))
    n_svfit = svfit.get_nb_trainable_parameters()[0]
    n_lora = lora.get_nb_trainable_parameters()[0]
    assert n_svfit == 12 * 32  # r per layer
    assert n_lora == 12 * 8 * (384 + 384)
    svfit.save_pretrained(tmp_path / "svfit")
    lora.save_pretrained(tmp_path / "lora")
    size_svfit = os.path.getsize(tmp_path / "svfit" / "adapter_model.safetensors")
    size_lora = os.path.getsize(tmp_path / "lora" / "adapter_model.safetensors")
    by_energy = get_peft_model(minilm(), SVFitConfig(energy=0.99, target_modules=targets))
    n_energy = by_energy.get_nb_trainable_parameters()[0]
    assert n_energy == sum(layer.r["default"] for layer in svfit_layers(by_energy).values())
    with capsys.disabled():
        print(
            f"\nMiniLM query+value: SVFit energy=0.99 trains {n_energy} parameters ({n_lora / n_energy:.1f}x fewer "
            f"than LoRA r=8)"
        )
        print(
            f"MiniLM query+value: SVFit r=32 trains {n_svfit} parameters, LoRA r=8 {n_lora} "
            f"({n_lora / n_svfit:.0f}x more); adapter files {size_svfit / 1e6:.2f} MB vs {size_lora / 1e6:.2f} MB"
        )
    # the file holds U_r and V_r too (frozen, needed to reload exactly): 4x LoRA r=8's factors at r=32
    assert size_svfit == pytest.approx(4 * size_lora, rel=0.02)


def test_trainer_trains_only_sigma(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(build("gpt2"), SVFitConfig(r=4, target_modules=["c_attn", "c_proj"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = [
        {"input_ids": ids, "labels": ids}
        for ids in torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(0))
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    Trainer(model=model, args=args, train_dataset=rows).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".svfit_delta." in n for n in changed)
