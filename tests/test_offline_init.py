"""init_adapter / `subspace-peft init`: the adapter written from a checkpoint on disk, one weight at a time, equals
the one get_peft_model + save_pretrained writes (keys, shapes, dtypes, values, adapter_config.json), loads without
any SVD, and gives the same outputs; bad input is refused before anything is written, and a failure midway leaves
nothing behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import subspace_peft
import subspace_peft.linalg.svd as svd_module
from subspace_peft import EffortConfig, FLoRAConfig, PiSSAConfig, SVFitConfig, init_adapter
from subspace_peft.cli import load_method_config, main
from subspace_peft.offline_init import _find_tensor

from tiny_models import perturb_trainable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-6


def tiny_llama(dtype=torch.float32, hidden=32):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=hidden * 3 // 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).to(dtype)


def tiny_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny models saved as transformers saves them: Llama in one file and in 4 shards, Llama in bf16, GPT-2
    (Conv1D) in one file and with its checkpoint keys lacking the 'transformer.' prefix (as the Hub's gpt2 has)."""
    root = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    llama = tiny_llama()
    paths["llama"] = str(root / "llama")
    llama.save_pretrained(paths["llama"])
    paths["llama_sharded"] = str(root / "llama_sharded")
    llama.save_pretrained(paths["llama_sharded"], max_shard_size="20KB")
    paths["llama_bf16"] = str(root / "llama_bf16")
    tiny_llama(torch.bfloat16).save_pretrained(paths["llama_bf16"])
    paths["gpt2"] = str(root / "gpt2")
    tiny_gpt2().save_pretrained(paths["gpt2"])
    paths["gpt2_bare_keys"] = str(root / "gpt2_bare_keys")
    shutil.copytree(paths["gpt2"], paths["gpt2_bare_keys"])
    file = os.path.join(paths["gpt2_bare_keys"], "model.safetensors")
    tensors = load_file(file)
    save_file({key.removeprefix("transformer."): value for key, value in tensors.items()}, file, {"format": "pt"})
    return paths


def reference_adapter(path, config, out, seed=0):
    """What a user with enough memory does: load, get_peft_model, save_pretrained."""
    base = AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    model.save_pretrained(out)
    return model


def assert_same_adapter(ours: str, reference: str) -> None:
    mine, theirs = (
        load_file(os.path.join(ours, "adapter_model.safetensors")),
        load_file(os.path.join(reference, "adapter_model.safetensors")),
    )
    assert set(mine) == set(theirs)
    for key, value in theirs.items():
        assert mine[key].dtype == value.dtype, key
        assert mine[key].shape == value.shape, key
        scale = value.float().norm().clamp_min(1e-30)
        assert ((mine[key].float() - value.float()).norm() / scale).item() <= TOL, key
    assert PeftConfig.from_pretrained(ours).to_dict() == PeftConfig.from_pretrained(reference).to_dict()
    with (
        open(os.path.join(ours, "adapter_config.json")) as a,
        open(os.path.join(reference, "adapter_config.json")) as b,
    ):
        written, expected = json.load(a), json.load(b)
    for values in (written, expected):  # a set, written in its (hash-seeded) iteration order, by peft too
        if isinstance(values["target_modules"], list):
            values["target_modules"] = sorted(values["target_modules"])
    assert written == expected
    with safe_open(os.path.join(ours, "adapter_model.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def _refuse_svd(patch) -> None:
    """Any SVD (torch's, or our linalg's) raises while ``patch`` is active."""

    def refuse(*args, **kwargs):
        raise AssertionError("an SVD ran while loading a saved adapter")

    for name in ("svd", "svdvals", "eigh"):
        patch.setattr(torch.linalg, name, refuse)
    patch.setattr(svd_module, "truncated_svd_batched", refuse)
    patch.setattr(svd_module, "singular_values", refuse)


def logits_after_training_step(model, seed=3):
    """Logits once every trainable tensor moved (as training would: at init every adapter's update is zero)."""
    perturb_trainable(model, scale=0.05, seed=seed)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


CONFIGS = {
    "pissa": lambda: PiSSAConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    "pissa_randomized": lambda: PiSSAConfig(r=3, target_modules=["q_proj", "down_proj"], init="randomized", niter=2),
    "svfit_energy": lambda: SVFitConfig(r=4, energy=0.9, target_modules="all-linear"),
    "effort": lambda: EffortConfig(residual_rank=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "flora": lambda: FLoRAConfig(r=3, target_modules="all-linear"),
}


@pytest.mark.parametrize("layout", ["llama", "llama_sharded"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_equals_get_peft_model_and_loads_without_svd(checkpoints, tmp_path, method, layout, monkeypatch):
    path = checkpoints[layout]
    ours, reference = str(tmp_path / "ours"), str(tmp_path / "reference")
    assert init_adapter(path, CONFIGS[method](), ours, device="cpu", seed=0, progress=False) == ours
    in_process = reference_adapter(path, CONFIGS[method](), reference, seed=0)
    assert_same_adapter(ours, reference)
    if method == "svfit_energy":  # ranks chosen by energy differ per layer and are recorded for reload
        ranks = PeftConfig.from_pretrained(ours).energy_ranks
        assert len(ranks) == 14 and len(set(ranks.values())) > 1

    expected = logits_after_training_step(in_process)
    base = AutoModelForCausalLM.from_pretrained(path)
    with monkeypatch.context() as patch:
        _refuse_svd(patch)
        loaded = PeftModel.from_pretrained(base, ours, is_trainable=True)
    assert sum(p.numel() for p in loaded.parameters() if p.requires_grad) == sum(
        p.numel() for p in in_process.parameters() if p.requires_grad
    )
    got = logits_after_training_step(loaded)
    assert ((got - expected).norm() / expected.norm()).item() <= TOL


def test_the_svd_spy_catches_an_init(checkpoints, monkeypatch):
    """The spy the load test relies on does fire on a fresh init."""
    _refuse_svd(monkeypatch)
    with pytest.raises(AssertionError, match="an SVD ran"):
        get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoints["llama"]), CONFIGS["pissa"]())


@pytest.mark.parametrize("layout", ["gpt2", "gpt2_bare_keys"])
@pytest.mark.parametrize("method", ["pissa", "svfit_energy", "effort"])
def test_gpt2_conv1d(checkpoints, tmp_path, method, layout, monkeypatch):
    """Transposed (Conv1D) weights; a checkpoint whose keys lack the 'transformer.' prefix gives the same adapter."""
    make = {
        "pissa": lambda: PiSSAConfig(r=4, target_modules="all-linear"),
        "svfit_energy": lambda: SVFitConfig(energy=0.8, target_modules=["c_attn", "c_fc"]),
        "effort": lambda: EffortConfig(residual_rank=3, target_modules=["c_attn", "c_proj"]),
    }[method]
    ours, reference = str(tmp_path / "ours"), str(tmp_path / "reference")
    init_adapter(checkpoints[layout], make(), ours, progress=False)
    in_process = reference_adapter(checkpoints["gpt2"], make(), reference)
    if layout == "gpt2":
        assert_same_adapter(ours, reference)
    else:  # the same tensors; the configs differ only in the base model's path
        mine, theirs = (load_file(os.path.join(d, "adapter_model.safetensors")) for d in (ours, reference))
        assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    expected = logits_after_training_step(in_process)
    base = AutoModelForCausalLM.from_pretrained(checkpoints["gpt2"])
    with monkeypatch.context() as patch:
        _refuse_svd(patch)
        loaded = PeftModel.from_pretrained(base, ours, is_trainable=True)
    got = logits_after_training_step(loaded)
    assert ((got - expected).norm() / expected.norm()).item() <= TOL


def test_bf16_checkpoint_dtypes(checkpoints, tmp_path):
    """A bf16 checkpoint: trainable tensors fp32 (peft's autocast), frozen initial factors bf16, as get_peft_model."""
    ours, reference = str(tmp_path / "ours"), str(tmp_path / "reference")
    init_adapter(checkpoints["llama_bf16"], CONFIGS["pissa"](), ours, progress=False)
    reference_adapter(checkpoints["llama_bf16"], CONFIGS["pissa"](), reference)
    assert_same_adapter(ours, reference)
    tensors = load_file(os.path.join(ours, "adapter_model.safetensors"))
    assert {str(t.dtype) for k, t in tensors.items() if ".pissa_A." in k} == {"torch.float32"}
    assert {str(t.dtype) for k, t in tensors.items() if ".pissa_A0." in k} == {"torch.bfloat16"}


@pytest.mark.parametrize("iters", [1, 3])
def test_qpissa(checkpoints, tmp_path, iters):
    """QPiSSA's adapter is PiSSA's factors of the full-precision weight (the residual is quantised from them on
    load), so it initialises per tensor too; loading it quantises the base as get_peft_model does. With
    residual_quant_iters the alternation runs per layer there as well and only changes the saved factors."""
    pytest.importorskip("bitsandbytes")
    path = str(tmp_path / "llama64")  # bitsandbytes' 4-bit blocks need 64 input features
    tiny_llama(hidden=64).save_pretrained(path)
    make = lambda: PiSSAConfig(  # noqa: E731
        r=4, target_modules=["q_proj", "up_proj"], residual_quantization="nf4", residual_quant_iters=iters
    )
    ours, reference = str(tmp_path / "ours"), str(tmp_path / "reference")
    init_adapter(path, make(), ours, progress=False)
    reference_adapter(path, make(), reference)
    assert_same_adapter(ours, reference)
    if iters > 1:  # the iterations ran: the saved factors are not plain QPiSSA's
        plain = str(tmp_path / "plain")
        init_adapter(path, PiSSAConfig(**{**make().to_dict(), "residual_quant_iters": 1}), plain, progress=False)
        factors = [load_file(os.path.join(folder, "adapter_model.safetensors")) for folder in (ours, plain)]
        moved = [key for key in factors[1] if ".pissa_A." in key and not torch.equal(factors[0][key], factors[1][key])]
        assert len(moved) == 4  # 2 layers x (q_proj, up_proj)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    logits = {}
    for name, folder in (("ours", ours), ("reference", reference)):
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), folder)
        with torch.no_grad():
            logits[name] = loaded(input_ids=ids).logits
    # (the in-process QPiSSA model differs from any reloaded one by ~3e-4 relative, ours and get_peft_model's alike)
    assert torch.equal(logits["ours"], logits["reference"])


# -- refusals, before anything is written ------------------------------------------------------------------------
def test_refuses_pickled_checkpoint(tmp_path):
    folder = tmp_path / "bin_only"
    folder.mkdir()
    tiny_llama().config.save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"no \*\.safetensors checkpoint.*pytorch_model\.bin.*convert it"):
        init_adapter(str(folder), CONFIGS["pissa"](), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_refuses_non_empty_out_dir_and_overwrites_on_request(checkpoints, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty.*overwrite=True"):
        init_adapter(checkpoints["llama"], CONFIGS["pissa"](), str(out))
    assert os.listdir(out) == ["keep.txt"]
    init_adapter(checkpoints["llama"], CONFIGS["pissa"](), str(out), overwrite=True, progress=False)
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert os.listdir(tmp_path) == ["out"]  # no temporary folder left beside it


@pytest.mark.parametrize(
    "config, match",
    [
        (LoraConfig(r=4, target_modules="all-linear"), "get_peft_model on the loaded model"),
        (PiSSAConfig(r=4, target_modules=["c_attn"], bias="all"), "bias='all'"),  # GPT-2's biases
        (PiSSAConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
        (PiSSAConfig(r=4, target_modules=["embed_tokens"]), "embedding"),
        (PiSSAConfig(r=40, target_modules=["q_proj"]), r"r=40 is larger than min\(d_out, d_in\) = 32"),
        (EffortConfig(residual_rank=32, target_modules=["q_proj"]), "residual_rank <= 31"),
        (PiSSAConfig(r=4, target_modules=["nothing_here"]), "matched no module"),
    ],
)
def test_refuses_before_computing(checkpoints, tmp_path, monkeypatch, config, match):
    _refuse_svd(monkeypatch)  # refused before any SVD
    model = "gpt2" if config.target_modules == {"c_attn"} else "llama"
    with pytest.raises(ValueError, match=match):
        init_adapter(checkpoints[model], config, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_shard_missing_a_tensor_is_refused_up_front(checkpoints, tmp_path, monkeypatch):
    folder = tmp_path / "broken"
    shutil.copytree(checkpoints["llama_sharded"], folder)
    with open(folder / "model.safetensors.index.json") as handle:
        weight_map = json.load(handle)["weight_map"]
    name = "model.layers.1.mlp.down_proj.weight"
    shard = folder / weight_map[name]
    save_file({k: v for k, v in load_file(shard).items() if k != name}, shard, {"format": "pt"})
    _refuse_svd(monkeypatch)
    with pytest.raises(ValueError, match=f"does not hold tensor '{name}'.*save the checkpoint again"):
        init_adapter(str(folder), CONFIGS["pissa"](), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_failure_midway_leaves_nothing(checkpoints, tmp_path):
    """A NaN in the last layer's weight is found only when that weight is read, after the other layers' SVDs: the
    error names it, out_dir is as it was (absent, or the old adapter), and no temporary folder remains."""
    folder = tmp_path / "nan"
    shutil.copytree(checkpoints["llama"], folder)
    file = folder / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(tensors, file, {"format": "pt"})
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(ValueError, match="'model.layers.1.mlp.down_proj' has NaN or Inf"):
        init_adapter(str(folder), CONFIGS["pissa"](), str(work / "out"), progress=False)
    assert os.listdir(work) == []
    old = work / "old"
    init_adapter(checkpoints["llama"], CONFIGS["effort"](), str(old), progress=False)
    before = {name: (old / name).read_bytes() for name in os.listdir(old)}
    with pytest.raises(ValueError, match="NaN or Inf"):
        init_adapter(str(folder), CONFIGS["pissa"](), str(old), overwrite=True, progress=False)
    assert {name: (old / name).read_bytes() for name in os.listdir(old)} == before
    assert os.listdir(work) == ["old"]


def test_tied_weight_and_prefix_lookup():
    files = {"model.embed_tokens.weight": "a", "h.0.attn.c_attn.weight": "b"}
    aliases = {"lm_head.weight": ["model.embed_tokens.weight", "lm_head.weight"]}
    assert _find_tensor("lm_head.weight", aliases, files, "model") == ("model.embed_tokens.weight", "a")
    assert _find_tensor("transformer.h.0.attn.c_attn.weight", {}, files, "transformer") == (
        "h.0.attn.c_attn.weight",
        "b",
    )
    assert _find_tensor("embed_tokens.weight", {}, files, "model") == ("model.embed_tokens.weight", "a")
    with pytest.raises(ValueError, match=r"no tensor for 'model.norm.weight' \(tried"):
        _find_tensor("model.norm.weight", {}, files, "model")


# -- the command line ---------------------------------------------------------------------------------------------
def test_cli_with_a_recipe_config(checkpoints, tmp_path, monkeypatch, capsys):
    """recipes/configs/pissa.yaml as it is (method + method_config; its svd_cache: true goes to a temporary folder)."""
    monkeypatch.setenv("SUBSPACE_PEFT_CACHE", str(tmp_path / "cache"))
    recipe = os.path.join(REPO, "recipes", "configs", "pissa.yaml")
    out = tmp_path / "out"
    assert (
        main(["init", "--model", checkpoints["llama"], "--config", recipe, "--out", str(out), "--device", "cpu"]) == 0
    )
    assert "wrote the initial PiSSA adapter" in capsys.readouterr().out
    assert os.listdir(tmp_path / "cache")  # the recipe's svd_cache was honoured
    config = load_method_config(recipe)
    from subspace_peft.methods import PISSA

    wanted = PISSA.recipe_defaults
    assert (config.r, config.init, config.niter) == (wanted["r"], wanted["init"], wanted["niter"])
    reference_adapter(checkpoints["llama"], config, str(tmp_path / "reference"))
    assert_same_adapter(str(out), str(tmp_path / "reference"))
    assert main(["init", "--model", checkpoints["llama"], "--config", recipe, "--out", str(out)]) == 1
    assert "pass overwrite=True (--overwrite)" in capsys.readouterr().err


def test_cli_flat_config_and_errors(checkpoints, tmp_path, capsys):
    flat = tmp_path / "svfit.yaml"
    flat.write_text("method: svfit\nr: 4\ntarget_modules: [q_proj, v_proj]\n")
    out = tmp_path / "out"
    assert main(["init", "--model", checkpoints["llama"], "--config", str(flat), "--out", str(out)]) == 0
    assert PeftConfig.from_pretrained(str(out)).target_modules == {"q_proj", "v_proj"}
    assert main(["init", "--model", checkpoints["llama"], "--config", str(flat), "--out", str(out)]) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    for text, match in [
        ("method: lora\nr: 4\n", "no offline init; choose one of"),
        ("method: pissa\nrank: 4\n", r"\['rank'\] in the file's keys are not PiSSAConfig fields"),
        ("r: 4\n", "with a 'method' key"),
        ("method: pissa\nr: 0\n", "r"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        assert main(["init", "--model", checkpoints["llama"], "--config", str(bad), "--out", str(tmp_path / "x")]) == 1
        assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # the installed command, a second process
def test_console_script(checkpoints, tmp_path):
    """`subspace-peft init` in a fresh process (the installed console script, else python -m subspace_peft.cli)."""
    config = tmp_path / "effort.yaml"
    config.write_text("method: effort\nmethod_config: {residual_rank: 1, target_modules: [q_proj]}\n")
    script = os.path.join(os.path.dirname(sys.executable), "subspace-peft")
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "subspace_peft.cli"]
    out = tmp_path / "out"
    done = subprocess.run(
        [*command, "init", "--model", checkpoints["llama"], "--config", str(config), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    reference_adapter(
        checkpoints["llama"], EffortConfig(residual_rank=1, target_modules=["q_proj"]), str(tmp_path / "r")
    )
    assert_same_adapter(str(out), str(tmp_path / "r"))


def test_exported_from_the_package():
    assert subspace_peft.init_adapter is init_adapter and "init_adapter" in subspace_peft.__all__


def test_an_index_pointing_outside_the_model_folder_is_refused(checkpoints, tmp_path):
    folder = tmp_path / "escaping"
    shutil.copytree(checkpoints["llama_sharded"], folder)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = next(iter(data["weight_map"]))
    shutil.copy(folder / data["weight_map"][name], tmp_path / "elsewhere.safetensors")
    data["weight_map"][name] = "../elsewhere.safetensors"  # the index is the checkpoint author's data
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="points outside"):
        init_adapter(str(folder), CONFIGS["pissa"](), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
