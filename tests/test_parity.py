"""Every check of the PEFT parity checklist, on every case in tests/parity.py."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import save_file

import subspace_peft  # noqa: F401  (registers our methods)

from parity import CASES, rel_err, run_python
from tiny_models import build, inputs, output_tensor

IDS = [case.id for case in CASES]


def forward(model, case):
    with torch.no_grad():
        return output_tensor(model(**inputs(case.model))).clone()


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def is_adapter_parameter(name, case):
    return any(f".{attr}." in name for attr in case.trainable_attrs)


def train_steps(model, case, steps=3, lr=1e-2):
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = output_tensor(model(**inputs(case.model))).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(params=CASES, ids=IDS)
def case(request):
    return request.param


def make(case, init=None, **overrides):
    """``init`` is one of ``case.inits`` (None: the method has no init modes)."""
    base = build(case.model)
    if init is not None:
        overrides["init"] = init
    return base, get_peft_model(base, case.make_config(**overrides))


# -- construction and training ---------------------------------------------------------------------------------
def test_only_adapter_parameters_train_and_count_matches_formula(case):
    _, model = make(case)
    names = trainable_names(model)
    assert names and all(is_adapter_parameter(n, case) for n in names), names
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == case.trainable
    assert model.get_nb_trainable_parameters()[0] == case.trainable


def test_every_adapter_parameter_trains_and_frozen_adapter_tensors_are_saved_buffers(case):
    from peft import get_peft_model_state_dict

    _, model = make(case)
    prefix = f"{case.peft_type.lower()}_"
    parameters = [n for n, _ in model.named_parameters() if prefix in n]
    assert parameters and all(p.requires_grad for n, p in model.named_parameters() if prefix in n), parameters
    frozen = [n for n, _ in model.named_buffers() if prefix in n]
    saved = get_peft_model_state_dict(model)
    # peft's convention: what an adapter keeps but does not train is a buffer, saved with the adapter
    for name in frozen:
        key = name.removeprefix("base_model.model.").replace(".default.", ".")
        assert any(k.endswith(key) for k in saved), (name, sorted(saved))
    assert len(saved) == len(parameters) + len(frozen)


def test_layers_expose_in_and_out_features_as_peft_lora_layers_do(case):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    def features(model):
        return {
            key: (module.in_features, module.out_features)
            for key, module in model.named_modules()
            if isinstance(module, BaseTunerLayer)
        }

    ours = features(make(case)[1])
    assert ours and all(isinstance(n, int) and n > 0 for pair in ours.values() for n in pair), ours
    if case.model != "grouped":  # peft's LoRA does not adapt grouped convolutions
        targets = case.make_config().target_modules
        assert ours == features(get_peft_model(build(case.model), LoraConfig(r=1, target_modules=list(targets))))


def test_outputs_equal_base_at_init(case):
    base = build(case.model)
    expected = forward(base, case)
    model = get_peft_model(base, case.make_config())
    assert rel_err(forward(model, case), expected) <= 1e-5


def test_training_changes_only_adapter_parameters(case):
    base = build(case.model)
    model = get_peft_model(base, case.make_config())
    before = snapshot(model)
    train_steps(model, case)
    after = snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "training changed nothing"
    assert all(is_adapter_parameter(k, case) for k in changed), changed


def test_gradient_checkpointing_reentrant_and_not(case):
    if not case.transformers_model:
        pytest.skip("gradient checkpointing is a transformers-model feature; this tiny model is a plain nn.Module")
    grads = {}
    for mode in (None, True, False):
        _, model = make(case)
        if mode is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode})
            model.enable_input_require_grads()
        model.train()
        output_tensor(model(**inputs(case.model))).pow(2).mean().backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert all(g is not None and torch.isfinite(g).all() for g in grads[mode].values())
    for mode in (True, False):
        for name, grad in grads[None].items():
            assert rel_err(grads[mode][name], grad) <= 1e-5, (mode, name)


def test_inputs_embeds_gives_same_outputs(case):
    if not case.transformers_model:
        pytest.skip("inputs_embeds is a transformers-model argument; this tiny model is a plain nn.Module")
    _, model = make(case)
    train_steps(model, case)
    batch = inputs(case.model)
    ids = batch.pop("input_ids")
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        by_embeds = output_tensor(model(inputs_embeds=embeds, **batch))
        by_ids = output_tensor(model(input_ids=ids, **batch))
    assert rel_err(by_embeds, by_ids) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_is_finite(case, dtype):
    _, model = make(case)
    model = model.to(dtype)
    batch = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs(case.model).items()}
    with torch.no_grad():
        out = output_tensor(model(**batch))
    assert torch.isfinite(out).all()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = output_tensor(model.float()(**inputs(case.model)))
    assert torch.isfinite(out).all()


def test_kbit_base(case):
    pytest.skip(case.skip["kbit"])


# -- adapters ----------------------------------------------------------------------------------------------------
def test_disable_adapter_gives_original_base_outputs(case):
    base = build(case.model)
    expected = forward(base, case)
    original = snapshot(base)
    model = get_peft_model(base, case.make_config())
    train_steps(model, case)
    with model.disable_adapter():
        assert rel_err(forward(model, case), expected) <= 1e-6
    for key, value in snapshot(model.get_base_model()).items():
        plain = key.replace("base_layer.", "")
        if plain in original:
            assert torch.equal(value, original[plain]), f"base weight {key} changed"


def test_add_set_delete_adapters(case):
    base = build(case.model)
    expected = forward(base, case)
    model = get_peft_model(base, case.make_config())
    train_steps(model, case)
    out_default = forward(model, case)
    model.add_adapter("other", case.make_config(**case.second_adapter))
    assert rel_err(forward(model, case), out_default) <= 1e-6, "an inactive adapter changed the outputs"
    model.set_adapter("other")
    assert rel_err(forward(model, case), expected) <= 1e-5, "a fresh second adapter must start at identity"
    train_steps(model, case)
    out_other = forward(model, case)
    model.set_adapter("default")
    assert rel_err(forward(model, case), out_default) <= 1e-6
    with pytest.raises(ValueError, match="nope"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="nope"):
        model.delete_adapter("nope")
    model.delete_adapter("default")  # the active one
    assert model.active_adapters == ["other"]
    assert rel_err(forward(model, case), out_other) <= 1e-6
    model.add_adapter("third", case.make_config())
    model.delete_adapter("third")  # an inactive one
    assert rel_err(forward(model, case), out_other) <= 1e-6
    model.delete_adapter("other")
    # a PeftModel cannot forward without any adapter (peft's own rule); its base model must be the original
    assert rel_err(forward(model.base_model.model, case), expected) <= 1e-6, "deleting every adapter must restore it"


def test_multiple_active_adapters_sum_their_updates(case):
    _, model = make(case)
    train_steps(model, case)
    model.add_adapter("other", case.make_config())
    model.set_adapter("other")
    train_steps(model, case)
    model.base_model.set_adapter(["default", "other"])
    both = forward(model, case)
    merged = model.merge_and_unload(adapter_names=["default", "other"])
    assert rel_err(forward(merged, case), both) <= 1e-5


def _two_batches(model_name):
    first, second = inputs(model_name, seed=1), inputs(model_name, seed=2)
    return {key: torch.cat([first[key], second[key]]) for key in first}


def two_moved_adapters(case):
    """``case``'s model with adapters "default" and "other", each moved well away from its init (and the other)."""
    model = get_peft_model(build(case.model), case.make_config())
    model.add_adapter("other", case.make_config(**case.second_adapter))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if is_adapter_parameter(name, case):
                noise = torch.randn(parameter.shape, generator=generator)
                if ".svfit_delta." in name:  # relative changes of the singular values, zero at init: ~20% each
                    parameter.add_(0.2 * noise)
                else:
                    parameter.add_(0.2 * parameter.abs().mean().clamp_min(0.05) * noise)
    return model.eval()


def test_mixed_adapter_batch_rows_equal_each_adapter_alone(case):
    model = two_moved_adapters(case)
    batch = _two_batches(case.model)
    rows = next(iter(batch.values())).shape[0]
    names = (["default", "other", "__base__"] * rows)[:rows]
    with torch.no_grad():
        mixed = output_tensor(model(**batch, adapter_names=names))
        alone = {}
        for name in ("default", "other"):
            model.set_adapter(name)
            alone[name] = output_tensor(model(**batch))
        with model.disable_adapter():
            alone["__base__"] = output_tensor(model(**batch))
    for row, name in enumerate(names):
        assert rel_err(mixed[row], alone[name][row]) <= 1e-5, (row, name)
    for name in ("other", "__base__"):  # the three differ, so each row tests something
        assert rel_err(alone["default"], alone[name]) > 1e-3, name
    with pytest.raises(ValueError, match=r"does not have: typo"):
        model(**batch, adapter_names=["typo"] * rows)
    model.train()
    with pytest.raises(ValueError, match=r"training mode"):
        model(**batch, adapter_names=names)


@pytest.mark.parametrize("case", [c for c in CASES if c.model == "gpt2"], ids=lambda c: c.id)
def test_generate_with_mixed_adapter_batch(case):
    model = two_moved_adapters(case)
    ids = _two_batches("gpt2")["input_ids"]
    names = ["default", "other", "__base__", "other"]
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    mixed = model.generate(input_ids=ids, adapter_names=names, **settings)
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = model.generate(input_ids=ids[row : row + 1], **settings)
        else:
            model.set_adapter(name)
            alone = model.generate(input_ids=ids[row : row + 1], **settings)
        assert torch.equal(mixed[row], alone[0]), (row, name)


# -- merging -----------------------------------------------------------------------------------------------------
def test_merge_and_unload_matches_unmerged(case):
    _, model = make(case)
    train_steps(model, case)
    expected = forward(model, case)
    merged = model.merge_and_unload(safe_merge=True)
    assert not any(case.trainable_attrs[0] in n for n, _ in merged.named_modules())
    assert rel_err(forward(merged, case), expected) <= 1e-5


def test_merge_is_idempotent_and_unmerge_restores(case):
    base = build(case.model)
    original = snapshot(base)
    model = get_peft_model(base, case.make_config())
    train_steps(model, case)
    expected = forward(model, case)
    model.merge_adapter()
    merged_once = forward(model, case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()  # already merged: no double merge
    assert rel_err(forward(model, case), merged_once) <= 1e-7
    assert rel_err(merged_once, expected) <= 1e-5
    model.unmerge_adapter()
    assert rel_err(forward(model, case), expected) <= 1e-5
    restored = model.unload()
    for key, value in original.items():
        assert rel_err(restored.state_dict()[key], value) <= 1e-6, key


def test_unload_returns_original_base_weights(case):
    base = build(case.model)
    original = snapshot(base)
    model = get_peft_model(base, case.make_config())
    train_steps(model, case)
    restored = model.unload()
    for key, value in original.items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_safe_merge_catches_nan(case):
    _, model = make(case)
    attr = case.trainable_attrs[0]
    layer = next(m for m in model.modules() if hasattr(m, attr))
    with torch.no_grad():
        getattr(layer, attr)["default"].weight.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.merge_and_unload(safe_merge=True)


# -- saving and loading ------------------------------------------------------------------------------------------
def test_save_is_safetensors_and_config_round_trips(case, tmp_path):
    _, model = make(case)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "adapter_model.bin").exists()
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == case.peft_type
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is type(case.make_config())


def test_selected_adapters_and_substring_names(case, tmp_path):
    _, model = make(case)
    model.add_adapter("defaultx", case.make_config(**case.second_adapter))
    model.set_adapter("defaultx")
    train_steps(model, case)
    out_x = forward(model, case)
    model.save_pretrained(tmp_path, selected_adapters=["defaultx"])
    again = PeftModel.from_pretrained(build(case.model), tmp_path / "defaultx")
    assert rel_err(forward(again, case), out_x) <= 1e-6
    again.load_adapter(tmp_path / "defaultx", adapter_name="default")
    again.set_adapter("default")
    assert rel_err(forward(again, case), out_x) <= 1e-6


def test_low_cpu_mem_usage_loading(case, tmp_path):
    _, model = make(case, init=case.inits[-1])
    train_steps(model, case)
    expected = forward(model, case)
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(build(case.model), tmp_path, low_cpu_mem_usage=True)
    assert rel_err(forward(again, case), expected) <= 1e-6
    assert not any(p.device.type == "meta" for p in again.parameters())


@pytest.fixture(scope="module")
def saved_cases(tmp_path_factory):
    """Every case trained, saved, and exported to LoRA, with its expected outputs; shared by the fresh processes."""
    root = tmp_path_factory.mktemp("saved")
    for case in CASES:
        for init in case.inits:
            folder = root / f"{case.id}-{init}"
            _, model = make(case, init=init)
            train_steps(model, case)
            model.save_pretrained(folder / "adapter")
            if case.exportable:
                subspace_peft.export_lora(model, folder / "lora")
            save_file({"out": forward(model, case)}, str(folder / "expected.safetensors"))
    return root


CHILD_RELOAD = r"""
import json, sys, torch
torch.manual_seed(12345)  # a different global RNG state than at save time
{imports}
from peft import PeftModel
from safetensors.torch import load_file
from tiny_models import build, inputs, output_tensor
results = {{}}
for case_id, model_name, inits in {cases!r}:
    for init in inits:
        folder = {root!r} + f"/{{case_id}}-{{init}}"
        model = PeftModel.from_pretrained(build(model_name), {source})
        with torch.no_grad():
            out = output_tensor(model(**inputs(model_name)))
        ref = load_file(folder + "/expected.safetensors")["out"]
        results[f"{{case_id}}-{{init}}"] = float((out.double() - ref.double()).norm() / ref.double().norm())
{check}
print("RESULTS " + json.dumps(results))
"""


def _child_results(saved_cases, sub, imports, check="", cases=CASES, env=None):
    code = CHILD_RELOAD.format(
        imports=imports,
        cases=[(c.id, c.model, c.inits) for c in cases],
        root=str(saved_cases),
        check=check,
        source=f'folder + "/{sub}"',
    )
    line = next(out for out in run_python(code, env=env).splitlines() if out.startswith("RESULTS "))
    return json.loads(line[len("RESULTS ") :])


def test_reload_in_fresh_process_reproduces_outputs(saved_cases):
    results = _child_results(saved_cases, "adapter", "import subspace_peft")
    assert len(results) == sum(len(case.inits) for case in CASES)
    for name, error in results.items():
        assert error <= 1e-6, (name, error)


def test_export_lora_loads_in_vanilla_peft_without_subspace_peft(saved_cases):
    check = "assert 'subspace_peft' not in sys.modules, 'the child imported subspace_peft'"
    exportable = [case for case in CASES if case.exportable]
    # as on a machine without this package: installed, it registers itself whenever peft is imported
    results = _child_results(saved_cases, "lora", "", check, exportable, env={"SUBSPACE_PEFT_AUTOREGISTER": "0"})
    assert len(results) == sum(len(case.inits) for case in exportable)
    for name, error in results.items():
        assert error <= 1e-5, (name, error)
    for case in exportable:
        config = json.loads((saved_cases / f"{case.id}-{case.inits[0]}" / "lora" / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA"


CHILD_PUSH = r"""
import torch
import subspace_peft
from peft import PeftModel
from tiny_models import build
for case_id, model_name, inits in {cases!r}:
    for init in inits:
        folder = {root!r} + f"/{{case_id}}-{{init}}"
        PeftModel.from_pretrained(build(model_name), folder + "/adapter").push_to_hub(f"user/{{case_id}}-{{init}}")
"""


@pytest.mark.slow  # a multi-process run
def test_push_to_hub_round_trip(saved_cases):
    """push_to_hub in one process, PeftModel.from_pretrained(repo id) in another, against the loopback fake Hub."""
    from fake_hub import FakeHub

    cases = [(c.id, c.model, c.inits) for c in CASES]
    with FakeHub() as hub:
        env = hub.env({"HF_HOME": str(saved_cases / "hf_home")})
        run_python(CHILD_PUSH.format(cases=cases, root=str(saved_cases)), env=env)
        assert len(hub.repos.files) == sum(len(c.inits) for c in CASES)
        code = CHILD_RELOAD.format(
            imports="import subspace_peft",
            cases=cases,
            root=str(saved_cases),
            check="",
            source='f"user/{case_id}-{init}"',
        )
        line = next(out for out in run_python(code, env=env).splitlines() if out.startswith("RESULTS "))
    for name, error in json.loads(line[len("RESULTS ") :]).items():
        assert error <= 1e-6, (name, error)
