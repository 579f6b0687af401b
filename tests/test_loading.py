"""Loading a saved adapter is a load: no SVD, no cache, no file written, strict about what the file holds, and a
refusal leaves the base model bit for bit as it was."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from test_parity import forward, train_steps

from subspace_peft import EffortConfig, FLoRAConfig, PiSSAConfig, SVFitConfig

from parity import CASES, rel_err
from tiny_models import build, inputs, output_tensor

TINY_CASES = [case for case in CASES if case.model != "minilm"]
DECOMPOSITIONS = {
    torch.linalg: ("svd", "svdvals", "eig", "eigh", "eigvals", "eigvalsh", "qr"),
    torch: ("svd", "svd_lowrank", "pca_lowrank"),
}


@pytest.fixture
def refuse_decompositions(monkeypatch, tmp_path):
    """Call it after saving: from then on every torch SVD / eigen / QR routine raises and the SVD cache folder is
    watched, so whatever loads afterwards must need neither."""
    cache = tmp_path / "cache-root"

    def refuse_from_now_on():
        def refuse(*args, **kwargs):
            raise AssertionError("a decomposition ran while loading a saved adapter")

        for module, names in DECOMPOSITIONS.items():
            for name in names:
                monkeypatch.setattr(module, name, refuse)
        monkeypatch.setenv("SUBSPACE_PEFT_CACHE", str(cache))

    yield refuse_from_now_on
    assert not cache.exists(), "loading wrote to the SVD cache"


def saved(case, folder, **overrides):
    """Train ``case`` a few steps and save it to ``folder``; returns its outputs."""
    model = get_peft_model(build(case.model), case.make_config(**overrides))
    train_steps(model, case)
    model.save_pretrained(folder)
    return forward(model, case)


def snapshot(module):
    return {key: value.clone() for key, value in module.state_dict().items()}


def assert_unchanged(module, before):
    after = module.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def files_under(folder):
    return sorted(
        (path, os.path.getmtime(os.path.join(path, name)), name) for path, _, names in os.walk(folder) for name in names
    )


# -- reload never initialises -------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", TINY_CASES, ids=[case.id for case in TINY_CASES])
def test_every_way_of_loading_runs_no_decomposition(case, tmp_path, refuse_decompositions):
    folder = tmp_path / "adapter"
    expected = saved(case, folder)
    before = files_under(tmp_path)
    refuse_decompositions()
    for low_cpu_mem_usage in (False, True):
        for is_trainable in (False, True):
            model = PeftModel.from_pretrained(
                build(case.model), folder, low_cpu_mem_usage=low_cpu_mem_usage, is_trainable=is_trainable
            )
            assert rel_err(forward(model, case), expected) <= 1e-6, (low_cpu_mem_usage, is_trainable)
            assert any(p.requires_grad for p in model.parameters()) == is_trainable
            assert not any(p.device.type == "meta" for p in model.parameters())
    model = PeftModel.from_pretrained(build(case.model), folder, adapter_name="first")
    for low_cpu_mem_usage in (False, True):  # load_adapter: a second adapter beside the first
        name = f"second_{int(low_cpu_mem_usage)}"
        model.load_adapter(folder, adapter_name=name, low_cpu_mem_usage=low_cpu_mem_usage)
        model.set_adapter(name)
        assert rel_err(forward(model, case), expected) <= 1e-6
    assert files_under(tmp_path) == before, "loading wrote a file"


MINILM_CASES = [case for case in CASES if case.model == "minilm"]


@pytest.mark.parametrize("case", MINILM_CASES, ids=[case.id for case in MINILM_CASES])
def test_real_pretrained_model_reloads_without_decomposition(case, tmp_path, refuse_decompositions):
    expected = saved(case, tmp_path)
    refuse_decompositions()
    for low_cpu_mem_usage in (False, True):
        model = PeftModel.from_pretrained(build(case.model), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
        assert rel_err(forward(model, case), expected) <= 1e-6


@pytest.mark.parametrize(
    "make_config",
    [
        lambda: PiSSAConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"]),
        lambda: SVFitConfig(energy=0.9, target_modules=["c_attn"]),
        lambda: EffortConfig(residual_rank=2, target_modules=["c_attn"]),
        lambda: FLoRAConfig(r=3, target_modules=["c_attn"]),
    ],
    ids=["pissa", "svfit-energy", "effort", "flora"],
)
def test_auto_peft_model_loads_without_decomposition(make_config, tmp_path, refuse_decompositions):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    build("gpt2").save_pretrained(base_dir)
    model = get_peft_model(build("gpt2"), make_config())
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    gpt2 = next(case for case in CASES if case.model == "gpt2")
    train_steps(model, gpt2)
    expected = forward(model, gpt2)
    model.save_pretrained(adapter_dir)
    refuse_decompositions()
    again = AutoPeftModelForCausalLM.from_pretrained(adapter_dir, dtype=torch.float32)
    with torch.no_grad():
        got = output_tensor(again(**inputs("gpt2")))
    assert rel_err(got, expected) <= 1e-6


def test_svfit_energy_ranks_are_saved_and_reused(tmp_path, refuse_decompositions):
    config = SVFitConfig(energy=0.8, target_modules=["lin0", "lin1"])
    model = get_peft_model(build("mlp"), config)
    ranks = {
        key: module.r["default"]
        for key, module in model.base_model.model.named_modules()
        if hasattr(module, "r") and isinstance(module.r, dict)
    }
    assert model.peft_config["default"].energy_ranks == ranks and all(1 <= r <= 10 for r in ranks.values())
    assert config.energy_ranks is None  # recorded in the adapter's copy; the user's config object is not written to
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["energy_ranks"] == ranks
    refuse_decompositions()
    again = PeftModel.from_pretrained(build("mlp"), tmp_path)
    assert again.peft_config["default"].energy_ranks == ranks


def test_config_used_again_after_its_load_initialises_afresh(tmp_path):
    case = CASES[0]  # PiSSA on the MLP
    saved(case, tmp_path)
    loaded = PeftModel.from_pretrained(build(case.model), tmp_path)
    fresh = get_peft_model(build(case.model), loaded.peft_config["default"])
    assert rel_err(forward(fresh, case), forward(build(case.model), case)) <= 1e-5  # PiSSA is the base at init


def test_saved_config_without_its_checkpoint_refuses_to_run(tmp_path):
    case = CASES[0]
    saved(case, tmp_path)
    base = build(case.model)
    model = get_peft_model(base, PiSSAConfig.from_pretrained(tmp_path))
    with pytest.raises(ValueError, match=r"weights have not been loaded.*PeftModel.from_pretrained"):
        model(**inputs(case.model))
    with pytest.raises(ValueError, match=r"weights have not been loaded"):
        model.merge_and_unload()


# -- QPiSSA ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qpissa_reloads_without_decomposition_with_either_low_cpu_mem_usage(kind, tmp_path, refuse_decompositions):
    pytest.importorskip("bitsandbytes")
    from tiny_models import MLP

    torch.manual_seed(0)
    base = MLP()
    for name in ("lin0", "lin1"):  # bitsandbytes' CPU 4-bit kernels want widths that are multiples of 64
        setattr(base, name, torch.nn.Linear(64, 64))
    base.lin2 = torch.nn.Linear(64, 3)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    model = get_peft_model(base, PiSSAConfig(r=4, target_modules=["lin0", "lin1"], residual_quantization=kind))
    model.eval()  # as the reloaded model (bitsandbytes' CPU kernels repack 4-bit weights on an eval forward)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "pissa_A") and "default" in module.pissa_A:
                module.pissa_A["default"].weight.mul_(1.1)
        expected = model(x)
    model.save_pretrained(tmp_path / "adapter")
    refuse_decompositions()
    for low_cpu_mem_usage in (False, True):
        fresh = MLP()
        for name in ("lin0", "lin1"):
            setattr(fresh, name, torch.nn.Linear(64, 64))
        fresh.lin2 = torch.nn.Linear(64, 3)
        fresh.load_state_dict(state)
        again = PeftModel.from_pretrained(fresh, tmp_path / "adapter", low_cpu_mem_usage=low_cpu_mem_usage)
        with torch.no_grad():
            got = again(x)
        assert torch.equal(got, expected), (low_cpu_mem_usage, (got - expected).abs().max())
        assert type(again.base_model.model.lin0.base_layer).__name__ in ("Linear4bit", "Linear8bitLt")


# -- strict loading -----------------------------------------------------------------------------------------------
def _edit_checkpoint(folder, edit):
    path = os.path.join(folder, "adapter_model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize("case", [c for c in TINY_CASES if c.model == "mlp"], ids=lambda c: c.id)
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_missing_tensor_is_an_error_naming_it(case, low_cpu_mem_usage, tmp_path):
    saved(case, tmp_path)
    victim = sorted(load_file(tmp_path / "adapter_model.safetensors"))[0]
    _edit_checkpoint(tmp_path, lambda tensors: tensors.pop(victim))
    base = build(case.model)
    before = snapshot(base)
    expected_key = victim.replace(".weight", ".default.weight")
    with pytest.raises(ValueError, match=rf"lacks '{expected_key}'.*save the adapter again"):
        PeftModel.from_pretrained(base, tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    assert_unchanged(base, before)


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_file_of_another_method_is_an_error_naming_a_tensor(low_cpu_mem_usage, tmp_path):
    saved(CASES[0], tmp_path)  # a PiSSA adapter whose config is then relabelled SVFit
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config.update(peft_type="SVFIT")
    for key in (
        "lora_alpha",
        "lora_dropout",
        "alpha_pattern",
        "fan_in_fan_out",
        "residual_quantization",
        "residual_quant_storage",
    ):
        config.pop(key, None)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    base = build("mlp")
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"SVFit checkpoint lacks '.*svfit_.*another method"):
        PeftModel.from_pretrained(base, tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    assert_unchanged(base, before)


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_tensor_of_the_wrong_shape_is_an_error_naming_it(low_cpu_mem_usage, tmp_path):
    saved(CASES[0], tmp_path)
    _edit_checkpoint(tmp_path, lambda t: t.update({"base_model.model.lin1.pissa_A0.weight": torch.zeros(3, 20)}))
    base = build("mlp")
    before = snapshot(base)
    with pytest.raises(
        ValueError,
        match=r"'base_model.model.lin1.pissa_A0.default.weight' has shape \(3, 20\) but "
        r"layer 'lin1' of this model needs \(4, 20\).*ignore_mismatched_sizes",
    ):
        PeftModel.from_pretrained(base, tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    assert_unchanged(base, before)


@pytest.mark.parametrize("case", [c for c in TINY_CASES if c.model == "embedding"], ids=lambda c: c.id)
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_ignore_mismatched_sizes_loads_the_rest_and_initialises_the_resized_layer(case, low_cpu_mem_usage, tmp_path):
    """As after resize_token_embeddings: the embedding's adapter no longer fits; peft's flag skips it (as for LoRA)."""
    saved(case, tmp_path)
    trained = PeftModel.from_pretrained(build(case.model), tmp_path)

    def resized():
        base = build(case.model)
        old = base.emb
        base.emb = torch.nn.Embedding(34, old.embedding_dim)
        with torch.no_grad():
            base.emb.weight[:30] = old.weight
        return base

    with pytest.raises(ValueError, match=r"'base_model.model.emb\..*has shape.*ignore_mismatched_sizes=True"):
        PeftModel.from_pretrained(resized(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    with pytest.warns(UserWarning, match=r"\['emb'\] did not fit this model.*fresh initialisation"):
        model = PeftModel.from_pretrained(
            resized(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage, ignore_mismatched_sizes=True
        )
    emb, lin = model.base_model.model.emb, model.base_model.model.lin
    assert emb.get_delta_weight("default").abs().max() <= 1e-5  # fresh: the update is zero at init
    torch.testing.assert_close(
        lin.get_delta_weight("default"), trained.base_model.model.lin.get_delta_weight("default"), rtol=0, atol=0
    )
    assert not any(p.device.type == "meta" for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())  # loaded for inference, the fresh layer too


# -- config values from a file are data ---------------------------------------------------------------------------
def test_svd_cache_in_a_saved_config_is_never_written(tmp_path):
    target = tmp_path / "planted" / "deep"
    config = PiSSAConfig(r=4, target_modules=["lin0"], svd_cache=str(tmp_path / "mine"))
    model = get_peft_model(build("mlp"), config)
    model.save_pretrained(tmp_path / "adapter")
    saved_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "svd_cache" not in saved_config, "a machine's cache folder is not part of the adapter"
    saved_config["svd_cache"] = str(target)
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(saved_config))
    with pytest.warns(UserWarning, match="svd_cache=.* is ignored"):
        loaded = PeftConfig.from_pretrained(tmp_path / "adapter")
    assert loaded.svd_cache is None
    get_peft_model(build("mlp"), loaded)  # even a fresh init from that config
    with pytest.warns(UserWarning, match="svd_cache=.* is ignored"):
        PeftModel.from_pretrained(build("mlp"), tmp_path / "adapter")
    assert not (tmp_path / "planted").exists()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("niter", 1_000_000_000, r"niter must be an integer in \[0, 64\]"),
        ("niter", -1, r"niter must be an integer in \[0, 64\]"),
        ("niter", 2.5, r"niter must be an integer"),
        ("oversample", 10**9, r"oversample must be an integer in \[0, 4096\]"),
        ("r", 0, r"r must be an integer >= 1"),
        ("r", True, r"r must be an integer >= 1"),
        ("lora_alpha", -8, r"lora_alpha must be a finite number > 0"),
        ("lora_alpha", "NaN", r"lora_alpha must be a finite number"),
        ("rank_pattern", {"lin0": -3}, r"rank_pattern\['lin0'\] must be an integer >= 1"),
        ("alpha_pattern", {"lin0": 0}, r"alpha_pattern\['lin0'\] must be a finite number"),
        ("seed", -1, r"seed must be an integer"),
    ],
)
def test_compute_and_numeric_values_in_a_file_are_bounded_before_use(field, value, message, tmp_path):
    get_peft_model(build("mlp"), PiSSAConfig(r=4, target_modules=["lin0"])).save_pretrained(tmp_path)
    text = (tmp_path / "adapter_config.json").read_text()
    config = json.loads(text)
    config[field] = float("nan") if value == "NaN" else value
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    base = build("mlp")
    before = snapshot(base)
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(base, tmp_path)
    assert_unchanged(base, before)


STATE_FIELDS_PEFT_WRITES = {"base_model_name_or_path"}  # peft's get_peft_model writes it into the config it is given


@pytest.mark.parametrize(
    "config",
    [*(case.make_config for case in TINY_CASES[:1]), lambda: SVFitConfig(energy=0.8, target_modules=["lin0", "lin1"])],
    ids=["pissa", "svfit-energy"],
)
def test_no_state_is_left_in_the_users_config_or_on_the_tuner(config, tmp_path):
    """What a call decides travels as arguments (or in the adapter's own copy of the config): the user's config object
    holds what it held, and the tuner keeps no per-call attribute after get_peft_model, a save and a load."""
    given = config()
    before = {k: v for k, v in given.to_dict().items() if k not in STATE_FIELDS_PEFT_WRITES}
    model = get_peft_model(build("mlp"), given)
    after = {k: v for k, v in given.to_dict().items() if k not in STATE_FIELDS_PEFT_WRITES}
    assert after == before
    attributes = set(vars(model.base_model))
    model.save_pretrained(tmp_path)
    model.load_adapter(tmp_path, adapter_name="again")
    assert set(vars(model.base_model)) == attributes
    assert not {"_plans_to_inject", "_checkpoint_load"} & attributes
