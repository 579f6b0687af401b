"""Effort-specific checks: minor-component init, the two losses against their dense definitions, the Trainer hook,
bad input, export rank, and that no weight-sized frozen tensor is kept."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer, TrainingArguments

import subspace_peft
from subspace_peft import EffortConfig
from subspace_peft.tuners.effort.layer import EffortLayer

from parity import assert_refused_unchanged, rel_err
from tiny_models import build, inputs, perturb_trainable


class ThreeShapes(nn.Module):
    """A tall (20x10), a square (20x20) and a wide (6x20) weight: the orthogonality loss differs for each."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tall, self.square, self.wide = nn.Linear(10, 20), nn.Linear(20, 20), nn.Linear(20, 6)

    def forward(self, x):
        return self.wide(torch.relu(self.square(torch.relu(self.tall(x)))))


def effort_layers(model):
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, EffortLayer)}


def dense_losses(layer, adapter="default"):
    """Both of a layer's normalised losses from their definitions, with the full SVD of the base weight and dense
    matrices: the orthogonality loss over 2 r (r trained directions on each side), the norm loss over ||W||_F^2."""
    weight = subspace_peft.tuners.targets.weight_matrix(layer.get_base_layer()).detach().double()
    u_full, s_full, vh_full = torch.linalg.svd(weight, full_matrices=False)
    r = layer.r[adapter]
    k = s_full.shape[0] - r
    u, s, vh = (t.double() for t in layer._triplet(adapter))
    stacked_u, stacked_v = torch.cat([u_full[:, :k], u], 1), torch.cat([vh_full[:k].T, vh.T], 1)
    eye = torch.eye(stacked_u.shape[1], dtype=torch.float64)
    orth = (stacked_u.T @ stacked_u - eye).pow(2).sum() + (stacked_v.T @ stacked_v - eye).pow(2).sum()
    u0, s0, vh0 = (t.double() for t in layer._triplet(adapter, initial=True))
    adapted = weight + u @ torch.diag(s) @ vh - u0 @ torch.diag(s0) @ vh0
    norm = (adapted.pow(2).sum() - weight.pow(2).sum()).abs()
    return orth / (2 * r), norm / weight.pow(2).sum()


def test_initial_factors_are_the_minor_triplets_and_the_principal_part_is_untouched():
    base = ThreeShapes()
    weights = {n: m.weight.detach().clone() for n, m in base.named_children()}
    model = get_peft_model(base, EffortConfig(residual_rank=3, target_modules=["tall", "square", "wide"]))
    for name, layer in effort_layers(model).items():
        u_full, s_full, vh_full = torch.linalg.svd(weights[name], full_matrices=False)
        u, s, vh = layer._triplet("default")
        assert rel_err(s, s_full[-3:]) <= 1e-5, name
        # singular vectors up to sign
        assert rel_err((u * u_full[:, -3:]).sum(0).abs(), torch.ones(3)) <= 1e-5, name
        assert rel_err((vh * vh_full[-3:]).sum(1).abs(), torch.ones(3)) <= 1e-5, name
        principal = weights[name] - u @ torch.diag(s) @ vh
        k = s_full.shape[0] - 3
        assert rel_err(principal, u_full[:, :k] @ torch.diag(s_full[:k]) @ vh_full[:k]) <= 1e-5, name


@pytest.mark.parametrize(
    "model_name, targets",
    [
        ("mlp", ["lin0", "lin1", "lin2"]),
        ("conv2d", ["conv", "conv2"]),
        ("conv1d", ["conv"]),
        ("conv3d", ["conv"]),
        ("embedding", ["emb", "lin"]),
        ("gpt2", ["c_attn", "c_proj"]),
        ("minilm", ["query", "key", "value", "dense"]),
    ],
)
def test_both_losses_are_zero_at_init(model_name, targets):
    model = get_peft_model(build(model_name), EffortConfig(target_modules=targets))
    losses = model.base_model.subspace_losses()
    assert losses["norm"].item() == 0.0  # exactly: each term is computed the same way for W and W_0
    assert 0.0 <= losses["orth"].item() <= 1e-9  # fp32 round-off of orthonormal U, V
    assert model.base_model.subspace_loss().item() <= 1e-9 * EffortConfig().orth_weight  # the weighted round-off


@pytest.mark.parametrize(
    "model_name, targets",
    [
        ("three", ["tall", "square", "wide"]),
        ("conv2d", ["conv", "conv2"]),
        ("embedding", ["emb", "lin"]),
        ("gpt2", ["c_attn"]),
    ],
)
def test_losses_equal_their_dense_definitions_after_the_factors_move(model_name, targets):
    base = ThreeShapes() if model_name == "three" else build(model_name)
    model = get_peft_model(
        base, EffortConfig(residual_rank=2, target_modules=targets, orth_weight=0.3, norm_weight=2.0)
    )
    perturb_trainable(model)
    orth, norm = 0.0, 0.0
    layers = effort_layers(model)
    for layer in layers.values():
        layer_orth, layer_norm = dense_losses(layer)
        orth, norm = orth + layer_orth / len(layers), norm + layer_norm / len(layers)  # means over the layers
    losses = model.base_model.subspace_losses()
    assert losses["orth"].item() == pytest.approx(orth.item(), rel=1e-5)
    assert losses["norm"].item() == pytest.approx(norm.item(), rel=1e-4)
    assert model.base_model.subspace_loss().item() == pytest.approx(0.3 * orth.item() + 2.0 * norm.item(), rel=1e-4)


def test_official_u_ut_form_cannot_be_zero_for_a_tall_weight_while_ours_is():
    # The official code penalises ||[U_k U_res][U_k U_res]^T - I||: for d_out > d_in that is a rank-n projector minus
    # the d_out x d_out identity, so it is sqrt(d_out - d_in) at init and can never reach 0.
    model = get_peft_model(ThreeShapes(), EffortConfig(target_modules=["tall"]))
    layer = effort_layers(model)["tall"]
    u_full = torch.linalg.svd(layer.get_base_layer().weight.detach(), full_matrices=False)[0]
    official = (u_full @ u_full.T - torch.eye(20)).norm()
    assert official.item() == pytest.approx((20 - 10) ** 0.5, rel=1e-5)
    assert model.base_model.subspace_losses()["orth"].item() <= 1e-9


def _lm_batch(seed=0):
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def test_training_forward_leaves_the_loss_value_alone_and_evaluation_ties_no_regulariser():
    model = get_peft_model(build("gpt2"), EffortConfig(target_modules=["c_attn", "c_proj"], orth_weight=0.5))
    perturb_trainable(model)
    batch = _lm_batch()
    model.eval()
    task_loss = model(**batch).loss
    assert model.base_model.subspace_loss().item() > 1e-3
    model.train()  # the regulariser goes into the gradient (tests/test_effort_regulariser.py), not the value
    assert model(**batch).loss.item() == pytest.approx(task_loss.item(), rel=1e-6)
    assert model.base_model.pop_regulariser_log()["effort_loss"] == pytest.approx(
        model.base_model.subspace_loss().item(), rel=1e-5
    )
    with torch.no_grad():  # evaluation inside a training loop: no regulariser
        model(**batch)
    assert model.base_model.pop_regulariser_log() == {}
    with model.disable_adapter():
        base_loss = build("gpt2")(**batch).loss
        assert model(**batch).loss.item() == pytest.approx(base_loss.item(), rel=1e-5)


@pytest.mark.parametrize("how", ["unload", "merge_and_unload"])
def test_unloading_removes_the_loss_hook(how):
    base = build("gpt2")
    model = get_peft_model(base, EffortConfig(target_modules=["c_attn"]))
    assert len(base._forward_pre_hooks) == 1
    plain = getattr(model, how)()
    assert plain is base and len(base._forward_hooks) == 0 and len(base._forward_pre_hooks) == 0


def _train_with_trainer(tmp_path, orth_weight, norm_weight):
    torch.manual_seed(0)
    model = get_peft_model(
        build("gpt2"),
        EffortConfig(
            residual_rank=2, target_modules=["c_attn", "c_proj"], orth_weight=orth_weight, norm_weight=norm_weight
        ),
    )
    rows = [{k: v[i] for k, v in _lm_batch(seed).items()} for seed in range(4) for i in range(4)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=15,
        per_device_train_batch_size=4,
        learning_rate=3e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    subspace_peft.add_regulariser_callback(trainer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(any(f".{a}." in n for a in ("effort_U", "effort_S", "effort_Vh")) for n in changed)
    model.train()
    step_loss = trainer.compute_loss(model, {k: torch.stack([r[k] for r in rows[:4]]) for k in rows[0]})
    model.eval()
    task_loss = model(**{k: torch.stack([r[k] for r in rows[:4]]) for k in rows[0]}).loss
    return model.base_model.subspace_losses(), step_loss, task_loss, model.base_model.subspace_loss()


def test_trainer_trains_with_the_regularisers_and_no_extra_code(tmp_path):
    free, _, _, _ = _train_with_trainer(tmp_path / "free", 0.0, 0.0)
    regularised, step_loss, task_loss, weighted = _train_with_trainer(tmp_path / "reg", 10.0, 10.0)
    # Trainer's loss is the task loss; the regularisers reach the gradient (tests/test_effort_regulariser.py)
    assert step_loss.item() == pytest.approx(task_loss.item(), rel=1e-5) and weighted.item() > 0
    assert free["orth"].item() > 1e-3, "the unregularised run should drift off orthogonality"
    assert regularised["orth"].item() < 0.5 * free["orth"].item()
    assert regularised["norm"].item() < 0.5 * free["norm"].item()


def test_export_is_rank_two_r(tmp_path):
    model = get_peft_model(ThreeShapes(), EffortConfig(residual_rank=2, target_modules=["tall", "wide"]))
    perturb_trainable(model)
    config = subspace_peft.export_lora(model, tmp_path)
    assert set(config.rank_pattern.values()) == {4}
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert state["base_model.model.tall.lora_A.weight"].shape == (4, 10)
    assert state["base_model.model.wide.lora_B.weight"].shape == (6, 4)


def test_no_frozen_tensor_of_the_weight_size_is_kept():
    model = get_peft_model(ThreeShapes(), EffortConfig(residual_rank=2, target_modules=["tall", "square", "wide"]))
    model.base_model.subspace_loss()  # fills the non-square layers' principal bases
    shapes = {"tall": (20, 10), "square": (20, 20), "wide": (6, 20)}
    for name, layer in effort_layers(model).items():
        d_out, d_in = shapes[name]
        trained = sum(p.numel() for n, p in layer.named_parameters() if not n.startswith("base_layer"))
        initial = sum(b.numel() for n, b in layer.named_buffers() if not n.startswith("base_layer"))
        assert trained == initial == 2 * (d_out + d_in + 1), name  # trainable U, s, V; their initial values (buffers)
        n = min(d_out, d_in)
        _stamp, principal, initial_thin, square_norm = layer.effort_derived["default"]
        assert initial_thin.shape == (n, 2), name  # W V_0 or W^T U_0, on the shorter side
        assert square_norm.shape == (), name  # ||W||_F^2, the norm loss's denominator
        if d_out == d_in:
            assert principal is None, "square weights need no principal basis"
        else:
            assert principal[0].shape == (n, n - 2), name  # the shorter side's U_k or V_k, at most min(d)^2
    assert not any("derived" in key for key in model.state_dict()), "derived tensors are never saved"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(residual_rank=10, target_modules=["lin0"]),
            r"residual_rank=10 must be smaller than .* 10 of layer 'lin0'",
        ),
        (dict(residual_rank=3, target_modules=["lin0", "lin2"]), r"residual_rank=3 .* 3 of layer 'lin2'.*<= 2"),
        (dict(residual_rank=0, target_modules=["lin0"]), r"residual_rank must be an integer >= 1"),
        (dict(target_modules=["lin0"], rank_pattern={"lin0": 0}), r"lin0.*positive"),
        (dict(target_modules=["lin0"], init="randomized"), r"use init='svd'"),
        (dict(target_modules=["lin0"], orth_weight=-1.0), r"orth_weight must be a finite number >= 0"),
    ],
)
def test_bad_input_raises_before_anything_changes(kwargs, message):
    assert_refused_unchanged(build("mlp"), lambda: EffortConfig(**kwargs), message)


def test_losses_of_a_merged_model_ask_to_unmerge_first():
    model = get_peft_model(build("mlp"), EffortConfig(target_modules=["lin0"]))
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        model.base_model.subspace_loss()
    model.unmerge_adapter()
    assert model.base_model.subspace_loss().item() <= 1e-9


def test_minilm_parameter_count_against_lora_r8(capsys):
    from peft import LoraConfig

    from tiny_models import minilm

    targets = ["query", "key", "value", "attention.output.dense"]
    effort = get_peft_model(minilm(), EffortConfig(target_modules=targets))
    lora = get_peft_model(minilm(), LoraConfig(r=8, target_modules=targets))
    n_effort, n_lora = effort.get_nb_trainable_parameters()[0], lora.get_nb_trainable_parameters()[0]
    assert n_effort == 6 * 4 * (384 + 384 + 1)  # the paper's ViT-L/14 setting gives 24 * 4 * (1024 + 1024 + 1)
    assert n_lora == 6 * 4 * 8 * (384 + 384)
    with capsys.disabled():
        print(
            f"\nMiniLM attention projections: Effort r=1 trains {n_effort}, LoRA r=8 {n_lora} "
            f"({n_lora / n_effort:.1f}x more); same setting on CLIP ViT-L/14: {24 * 4 * 2049}"
        )
    out = effort(**inputs("minilm"))
    assert out.last_hidden_state.isfinite().all()
