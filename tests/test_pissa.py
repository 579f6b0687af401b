"""PiSSA-specific checks: the paper's math, PEFT parity, bad input, cache, QPiSSA, Trainer."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from subspace_peft import EffortConfig, FLoRAConfig, PiSSAConfig, SVFitConfig
from subspace_peft.tuners.pissa.bnb import dequantized_weight, quantize_residual
from subspace_peft.tuners.pissa.layer import PiSSALayer

from parity import assert_refused_unchanged, rel_err
from tiny_models import MLP, build, inputs, minilm, output_tensor


def pissa_layers(model):
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, PiSSALayer)}


def test_initial_factors_follow_the_paper():
    base = build("mlp")
    weight = base.lin1.weight.detach().clone()
    model = get_peft_model(base, PiSSAConfig(r=5, lora_alpha=10, target_modules=["lin1"]))
    layer = pissa_layers(model)["lin1"]
    s = 10 / 5
    u, sv, vh = torch.linalg.svd(weight, full_matrices=False)
    a, b = layer.pissa_A["default"].weight, layer.pissa_B["default"].weight
    # eq. 2: A = diag(sqrt(S_r / s)) V_r^T, B = U_r diag(sqrt(S_r / s)); singular vectors are defined up to sign
    signs = torch.sign((b * u[:, :5]).sum(0))
    assert rel_err(b * signs, u[:, :5] * torch.sqrt(sv[:5] / s)) <= 1e-5
    assert rel_err(a * signs[:, None], torch.sqrt(sv[:5] / s)[:, None] * vh[:5]) <= 1e-5
    # eq. 3: W_res = W - s B A is the rank-r truncation's remainder
    expected_residual = weight - u[:, :5] @ torch.diag(sv[:5]) @ vh[:5]
    assert rel_err(layer.residual_weight("default"), expected_residual) <= 1e-5


def test_matches_peft_builtin_pissa_on_minilm():
    targets = ["query", "value"]
    ours = get_peft_model(minilm(), PiSSAConfig(r=8, lora_alpha=8, target_modules=targets))
    theirs = get_peft_model(minilm(), LoraConfig(r=8, lora_alpha=8, target_modules=targets, init_lora_weights="pissa"))
    their_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    compared = 0
    for name, layer in pissa_layers(ours).items():
        peft_layer = their_layers[name]
        a, b = layer.pissa_A["default"].weight, layer.pissa_B["default"].weight
        peft_a, peft_b = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
        signs = torch.sign((b * peft_b).sum(0))
        assert rel_err(b * signs, peft_b) <= 1e-4, name
        assert rel_err(a * signs[:, None], peft_a) <= 1e-4, name
        # peft's residual is W minus its fp32 LAPACK factors, whose rounding depends on BLAS's thread count (3.7e-5
        # relative with one thread, below 1e-5 with two): the factors' own 1e-4 bounds it
        assert rel_err(layer.residual_weight("default"), peft_layer.get_base_layer().weight) <= 1e-4, name
        compared += 1
    assert compared == 12


def test_randomized_init_is_seeded_whatever_the_global_rng():
    factors = []
    for global_seed, seed in ((0, 7), (99, 7), (0, 8)):
        torch.manual_seed(global_seed)
        base = build("mlp")
        torch.manual_seed(global_seed + 1000)
        model = get_peft_model(base, PiSSAConfig(r=4, target_modules=["lin1"], init="randomized", seed=seed))
        factors.append(pissa_layers(model)["lin1"].pissa_A["default"].weight.detach().clone())
    assert torch.equal(factors[0], factors[1])
    assert not torch.equal(factors[0], factors[2])


# -- bad input: a ValueError naming the layer and the fix, and the model bit-for-bit unchanged ---------------------
class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.norm = nn.LayerNorm(5)
        self.grouped = nn.Conv2d(4, 4, 3, groups=2)
        self.conv = nn.Conv2d(2, 3, 3)


def _nan_model():
    model = Mixed()
    with torch.no_grad():
        model.lin.weight[1, 2] = float("nan")
    return model


def _inf_model():
    model = Mixed()
    with torch.no_grad():
        model.lin.weight[0, 0] = float("inf")
    return model


def _int_model():
    model = Mixed()
    model.lin.weight = nn.Parameter(torch.randint(-5, 5, (5, 6), dtype=torch.int8), requires_grad=False)
    return model


BAD = {
    "rank too large": (Mixed, dict(r=6, target_modules=["lin", "conv"]), r"lin.*r <= 5"),
    "rank zero": (Mixed, dict(r=0, target_modules=["lin"]), r"r must be an integer >= 1, got 0"),
    "rank negative": (Mixed, dict(r=-2, target_modules=["lin"]), r"r must be an integer >= 1, got -2"),
    "rank_pattern too large": (
        Mixed,
        dict(r=2, target_modules=["lin", "conv"], rank_pattern={"conv": 4}),
        r"conv.*r <= 3",
    ),
    "no match": (Mixed, dict(r=2, target_modules=["nothing_here"]), r"matched no module"),
    "unsupported layer": (Mixed, dict(r=2, target_modules=["lin", "norm"]), r"norm.*LayerNorm.*exclude_modules"),
    "grouped conv": (Mixed, dict(r=1, target_modules=["grouped"]), r"grouped.*groups=2"),
    "nan weight": (_nan_model, dict(r=2, target_modules=["conv", "lin"]), r"lin.*NaN or Inf"),
    "inf weight": (_inf_model, dict(r=2, target_modules=["lin"]), r"lin.*NaN or Inf"),
    "int weight": (_int_model, dict(r=2, target_modules=["conv", "lin"]), r"lin.*torch.int8.*residual_quantization"),
    "qpissa on conv": (
        Mixed,
        dict(r=1, target_modules=["lin", "conv"], residual_quantization="nf4"),
        r"nn.Linear residuals only.*conv",
    ),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_before_anything_changes(name):
    builder, kwargs, message = BAD[name]
    torch.manual_seed(0)
    assert_refused_unchanged(builder(), lambda: PiSSAConfig(**kwargs), message)


def test_loading_onto_a_base_of_other_shapes_is_a_clear_error(tmp_path):
    model = get_peft_model(build("mlp"), PiSSAConfig(r=4, target_modules=["lin0", "lin1"]))
    model.save_pretrained(tmp_path)
    other = MLP()
    other.lin0 = nn.Linear(10, 24)
    other.lin1 = nn.Linear(24, 20)
    with pytest.raises(
        ValueError,
        match=r"'base_model.model.lin0.pissa_B.default.weight' has shape \(20, 4\) but layer 'lin0'.*trained on",
    ):
        PeftModel.from_pretrained(other, tmp_path)


def test_svd_cache_hit_skips_the_svd(tmp_path, monkeypatch):
    config = dict(r=4, target_modules=["lin0", "lin1"], svd_cache=str(tmp_path))
    first = get_peft_model(build("mlp"), PiSSAConfig(**config))
    assert len(list(tmp_path.glob("*.safetensors"))) == 2 + 1  # one entry per layer, and the bundle of both

    def no_svd(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr("subspace_peft.linalg.svd.truncated_svd_batched", no_svd)
    second = get_peft_model(build("mlp"), PiSSAConfig(**config))
    for name, layer in pissa_layers(first).items():
        assert torch.equal(layer.pissa_A["default"].weight, pissa_layers(second)[name].pissa_A["default"].weight)
    # a changed weight is another key: a miss, so the SVD runs (and the patched one fails)
    changed = build("mlp")
    with torch.no_grad():
        changed.lin0.weight[0, 0] += 1.0
    with pytest.raises(AssertionError, match="cache should have answered"):
        get_peft_model(changed, PiSSAConfig(**config))


# -- QPiSSA ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qpissa_has_lower_quantization_error_than_qlora_on_minilm(kind, capsys):
    import bitsandbytes as bnb

    targets = ["query", "key", "value", "dense"]
    full = minilm()
    originals = {n: m.weight.detach().clone() for n, m in full.named_modules() if isinstance(m, nn.Linear)}
    model = get_peft_model(full, PiSSAConfig(r=64, lora_alpha=64, target_modules=targets, residual_quantization=kind))
    layers = pissa_layers(model)
    assert len(layers) == 6 * 6 + 1  # per block: query, key, value and three dense; plus the pooler
    qpissa_err = qlora_err = 0.0
    for name, layer in layers.items():
        base = layer.get_base_layer()
        assert isinstance(base, bnb.nn.Linear4bit if kind == "nf4" else bnb.nn.Linear8bitLt)
        weight = originals[name]
        rebuilt = dequantized_weight(base) + layer.get_delta_weight("default", initial=True)
        qpissa_err += torch.linalg.matrix_norm(weight - rebuilt, ord="nuc").item()
        plain = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        qlora = dequantized_weight(quantize_residual(plain, weight, kind))  # QLoRA: W itself quantised
        qlora_err += torch.linalg.matrix_norm(weight - qlora, ord="nuc").item()
    ratio = qpissa_err / qlora_err
    with capsys.disabled():
        print(f"\nQPiSSA/QLoRA nuclear-norm quantisation error on MiniLM ({kind}, r=64): {ratio:.3f}")
    assert ratio < 0.95


def test_qpissa_trains_and_disable_adds_the_principal_part_back(tmp_path):
    base = build("minilm")
    batch = inputs("minilm")
    with torch.no_grad():
        expected = output_tensor(base(**batch)).clone()
    model = get_peft_model(base, PiSSAConfig(r=16, target_modules=["query", "value"], residual_quantization="nf4"))
    with torch.no_grad():
        at_init = output_tensor(model(**batch))
        with model.disable_adapter():
            disabled = output_tensor(model(**batch))
    # the quantised residual plus the principal part is closer to the original model than QLoRA's quantised W
    qlora = build("minilm")
    for layer in qlora.encoder.layer:
        attention = layer.attention.self
        attention.query = quantize_residual(attention.query, attention.query.weight, "nf4")
        attention.value = quantize_residual(attention.value, attention.value.weight, "nf4")
    with torch.no_grad():
        qlora_out = output_tensor(qlora(**batch))
    assert rel_err(at_init, expected) < rel_err(qlora_out, expected)
    assert rel_err(disabled, at_init) <= 1e-5
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    output_tensor(model(**batch)).pow(2).mean().backward()
    optimizer.step()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".pissa_A." in n or ".pissa_B." in n for n in trainable)
    with pytest.raises(ValueError, match="quantised"):
        model.merge_and_unload()
    # a mixed batch: '__base__' rows get the original model (residual + principal part), the others the adapter
    model.eval()
    pair = {key: torch.cat([value, value]) for key, value in batch.items()}
    with torch.no_grad():
        mixed = output_tensor(model(**pair, adapter_names=["default", "default", "__base__", "__base__"]))
        adapted = output_tensor(model(**batch))
        with model.disable_adapter():
            original = output_tensor(model(**batch))
    assert rel_err(mixed[:2], adapted) <= 1e-5 and rel_err(mixed[2:], original) <= 1e-5
    assert rel_err(adapted, original) > 1e-4


def test_qpissa_quant_storage_sets_the_storage_dtype_and_keeps_the_outputs():
    batch = inputs("minilm")
    outputs = {}
    for storage in (None, "float32", "bfloat16"):
        config = PiSSAConfig(
            r=16, target_modules=["query", "value"], residual_quantization="nf4", residual_quant_storage=storage
        )
        model = get_peft_model(build("minilm"), config)
        bases = [layer.get_base_layer() for layer in pissa_layers(model).values()]
        assert {b.weight.dtype for b in bases} == {getattr(torch, storage or "uint8")}
        # the layer keeps the quant state too: bitsandbytes restores it from there when FSDP replaced the weight
        assert all(b.quant_state is b.weight.quant_state for b in bases)
        with torch.no_grad():
            outputs[storage] = output_tensor(model(**batch))
    # the storage dtype is a view of the same packed bytes: the computation is unchanged
    assert torch.equal(outputs[None], outputs["float32"]) and torch.equal(outputs[None], outputs["bfloat16"])


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(residual_quant_storage="int4"), "residual_quant_storage must be"),
        (dict(residual_quant_storage="float32"), "4-bit residuals only"),
        (dict(residual_quantization="int8", residual_quant_storage="float32"), "4-bit residuals only"),
    ],
)
def test_qpissa_quant_storage_bad_values(values, message):
    with pytest.raises(ValueError, match=message):
        PiSSAConfig(r=2, **values)


def test_second_adapter_on_qpissa_is_refused():
    model = get_peft_model(build("mlp"), PiSSAConfig(r=2, target_modules=["lin1"], residual_quantization="nf4"))
    with pytest.raises(ValueError, match="QPiSSA"):
        model.add_adapter("other", PiSSAConfig(r=2, target_modules=["lin1"]))


# -- integrations ----------------------------------------------------------------------------------------------
def test_trainer_with_gradient_checkpointing(tmp_path):
    from transformers import Trainer, TrainingArguments

    base = build("gpt2")
    model = get_peft_model(base, PiSSAConfig(r=4, target_modules=["c_attn", "c_proj"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (16, 12), generator=generator)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        gradient_checkpointing=True,
        logging_steps=1,
        save_strategy="no",
    )
    result = Trainer(model=model, args=args, train_dataset=rows).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".pissa_A." in n or ".pissa_B." in n for n in changed)


def test_import_is_idempotent_and_order_independent():
    from parity import run_python

    out = run_python(
        "import transformers, peft\n"
        "from peft import PeftConfig, get_peft_model\n"
        "import importlib, subspace_peft, subspace_peft.registry as r\n"
        "importlib.reload(r); importlib.reload(subspace_peft)\n"
        "from peft.utils.peft_types import PeftType\n"
        "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING\n"
        "assert PeftType('PISSA') is PeftType.PISSA and PeftType['PISSA'] is PeftType.PISSA\n"
        "assert PeftType.PISSA.value.lower() == 'pissa'\n"
        "assert list(PeftType).count(PeftType.PISSA) == 1\n"
        "print(PEFT_TYPE_TO_CONFIG_MAPPING['PISSA'].__name__)\n"
    )
    assert out.strip().endswith("PiSSAConfig")


# -- add_weighted_adapter -----------------------------------------------------------------------------------------
def _two_moved_pissa_adapters(model_name, targets, **extra):
    model = get_peft_model(build(model_name), PiSSAConfig(r=3, lora_alpha=6, target_modules=targets, **extra))
    model.add_adapter("b", PiSSAConfig(r=3, lora_alpha=3, target_modules=targets, init="randomized", seed=3, **extra))
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".pissa_A." in name or ".pissa_B." in name:
                parameter.add_(0.3 * parameter.abs().mean() * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def _deltas(model, adapter):
    return {
        key: module.get_delta_weight(adapter)
        for key, module in model.base_model.model.named_modules()
        if hasattr(module, "pissa_A") and adapter in module.pissa_A
    }


@pytest.mark.parametrize(
    "model_name, targets", [("mlp", ["lin0", "lin1"]), ("conv2d", ["conv", "conv2"]), ("embedding", ["emb"])]
)
def test_add_weighted_adapter_cat_is_the_exact_weighted_sum(model_name, targets, tmp_path):
    model = _two_moved_pissa_adapters(model_name, targets)
    model.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type="cat")
    a, b, mix = _deltas(model, "default"), _deltas(model, "b"), _deltas(model, "mix")
    assert mix.keys() == a.keys()
    for key in mix:
        assert rel_err(mix[key], 0.7 * a[key] - 0.4 * b[key]) <= 1e-5, key
    assert model.active_adapters == ["default"]
    model.set_adapter("mix")
    with torch.no_grad():
        expected = output_tensor(model(**inputs(model_name)))
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    again = PeftModel.from_pretrained(build(model_name), tmp_path / "mix")
    with torch.no_grad():
        assert rel_err(output_tensor(again(**inputs(model_name))), expected) <= 1e-6


def test_add_weighted_adapter_svd_is_the_best_low_rank_approximation():
    model = _two_moved_pissa_adapters("mlp", ["lin0", "lin1"])
    model.add_weighted_adapter(["default", "b"], [1.0, 0.5], "full", combination_type="svd", svd_rank=10)
    model.add_weighted_adapter(["default", "b"], [1.0, 0.5], "low", combination_type="svd")  # the max rank, 3
    a, b = _deltas(model, "default"), _deltas(model, "b")
    for key, full in _deltas(model, "full").items():
        target = (a[key] + 0.5 * b[key]).detach()
        assert rel_err(full, target) <= 1e-5, key  # rank 10 >= rank of the sum (at most 12 but min(d) = 10)
        singular = torch.linalg.svdvals(target.double())
        best = singular[3:].pow(2).sum().sqrt() / singular.pow(2).sum().sqrt()
        low = _deltas(model, "low")[key].detach()
        assert abs(rel_err(low, target) - float(best)) <= 1e-5, key  # Eckart-Young


def test_add_weighted_adapter_linear_follows_peft_and_refuses_what_it_cannot():
    model = _two_moved_pissa_adapters("mlp", ["lin0", "lin1"])
    model.add_weighted_adapter(["default", "b"], [0.5, 2.0], "lin", combination_type="linear")
    layer = model.base_model.model.lin0
    root_a, root_b = math.sqrt(0.5 * 2.0), math.sqrt(2.0 * 1.0)  # sqrt(weight * scale)
    for initial in (False, True):
        a_mix, b_mix = layer._matrices("lin", initial)
        (a_a, b_a), (a_b, b_b) = layer._matrices("default", initial), layer._matrices("b", initial)
        torch.testing.assert_close(a_mix, root_a * a_a + root_b * a_b)
        torch.testing.assert_close(b_mix, root_a * b_a + root_b * b_b)
    with pytest.raises(ValueError, match=r"weight of 'b' must be a finite number >= 0"):
        model.add_weighted_adapter(["default", "b"], [0.5, -1.0], "neg", combination_type="linear")
    with pytest.raises(ValueError, match=r"weight of 'b' must be a finite number"):
        model.add_weighted_adapter(["default", "b"], [0.5, float("nan")], "nan", combination_type="cat")
    with pytest.raises(ValueError, match=r"no adapter\(s\) \['typo'\]"):
        model.add_weighted_adapter(["default", "typo"], [1.0, 1.0], "x")
    with pytest.raises(ValueError, match=r"combination_type must be one of"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "x", combination_type="ties")
    with pytest.raises(ValueError, match=r"already exists"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "lin")
    small = _two_moved_pissa_adapters("embedding", ["emb", "lin"])  # 'lin' is 3 x 12: two rank-3 adapters do not fit
    with pytest.raises(ValueError, match=r"'cat' would give layer 'lin' rank 6, more than min\(d_out, d_in\) = 3"):
        small.add_weighted_adapter(["default", "b"], [1.0, 1.0], "x", combination_type="cat")
    assert "x" not in model.peft_config and "neg" not in model.peft_config


@pytest.mark.parametrize(
    "make_config",
    [
        lambda: SVFitConfig(r=2, target_modules=["lin0"]),
        lambda: EffortConfig(target_modules=["lin0"]),
        lambda: FLoRAConfig(r=2, target_modules=["lin0"]),
    ],
    ids=["svfit", "effort", "flora"],
)
def test_add_weighted_adapter_of_other_methods_names_subspace_peft_merging(make_config):
    model = get_peft_model(build("mlp"), make_config())
    model.add_adapter("b", make_config())
    with pytest.raises(ValueError, match=r"not one\. Combine .* subspace_peft\.merging"):
        model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix")


def test_peft_mixed_model_and_hotswap_refuse_our_adapters_clearly(tmp_path):
    """peft keeps both to its LoRA family (README): each refusal is peft's own ValueError naming the type."""
    from peft.utils.hotswap import hotswap_adapter

    with pytest.raises(ValueError, match=r"'PISSA' is not compatible with the `PeftMixedModel`"):
        get_peft_model(build("mlp"), PiSSAConfig(r=2, target_modules=["lin0"]), mixed=True)
    get_peft_model(build("mlp"), PiSSAConfig(r=2, target_modules=["lin0"])).save_pretrained(tmp_path)
    model = get_peft_model(build("mlp"), PiSSAConfig(r=2, target_modules=["lin0"], init="randomized"))
    with pytest.raises(ValueError, match=r"Hotswapping only supports LORA but PISSA was passed"):
        hotswap_adapter(model, str(tmp_path), adapter_name="default")
