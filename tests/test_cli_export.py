"""``subspace-peft export ADAPTER_DIR OUT_DIR [--base ...]``: a saved adapter's exact plain-LoRA form from a shell,
equal to ``export_lora`` on the loaded model, with no decomposition, and a one-line refusal (nothing written) when the
output exists, the adapter is not ours, is QPiSSA, has no exact LoRA form, or its base model cannot be found."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from test_loading import refuse_decompositions  # noqa: F401  (fixture)

import subspace_peft
from subspace_peft import PiSSAConfig
from subspace_peft.cli import main

from tiny_models import CAUSAL_LM_TARGETS, causal_lm_configs, perturb_trainable

TARGETS = CAUSAL_LM_TARGETS
CONFIGS = causal_lm_configs()
IDS = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The base model saved, and a moved-off-init adapter of every method saved against it (with its logits)."""
    root = tmp_path_factory.mktemp("export")
    llama().save_pretrained(root / "base")
    logits = {}
    for method, make in CONFIGS.items():
        from transformers import AutoModelForCausalLM

        model = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "base"), make())
        perturb_trainable(model, scale=0.05)
        model.save_pretrained(root / method)
        with torch.no_grad():
            logits[method] = model.eval()(input_ids=IDS).logits
    return root, logits


def export(*argv: str, capsys=None) -> tuple[int, str, str]:
    if capsys is not None:
        capsys.readouterr()  # what came before (building the test's models) is not the command's output
    status = main(["export", *map(str, argv)])
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return status, out, err


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_export_writes_the_exact_lora_with_no_decomposition(saved, method, tmp_path, capsys, refuse_decompositions):
    root, logits = saved
    from transformers import AutoModelForCausalLM

    reference = tmp_path / "reference"
    subspace_peft.export_lora(
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), root / method), reference
    )
    refuse_decompositions()
    status, out, _ = export(root / method, tmp_path / "lora", capsys=capsys)
    assert status == 0 and f"to {tmp_path / 'lora'}: rank" in out
    written, expected = (
        load_file(tmp_path / "lora" / "adapter_model.safetensors"),
        load_file(reference / "adapter_model.safetensors"),
    )
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[key], expected[key]) for key in expected)
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), tmp_path / "lora").eval()
    with torch.no_grad():
        got = plain(input_ids=IDS).logits
    assert float((got - logits[method]).abs().max() / logits[method].abs().max()) <= 1e-5


def test_base_flag_when_the_base_moved(saved, tmp_path, capsys):
    root, _ = saved
    moved = tmp_path / "adapter"
    moved.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (moved / name).write_bytes((root / "pissa" / name).read_bytes())
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    status, _, err = export(moved, tmp_path / "a", capsys=capsys)
    assert status == 1 and "could not be loaded" in err and "pass --base" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()
    assert export(moved, tmp_path / "b", "--base", root / "base", capsys=capsys)[0] == 0
    assert (tmp_path / "b" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    "case, message",
    [
        ("exists", "already exists and is not an empty folder"),
        ("lora", "peft's own: it loads without this package already"),
        ("not-an-adapter", "holds no adapter_config.json"),
        ("qpissa", "QPiSSA adapter: its LoRA form belongs on the quantised residual base"),
        ("biases", "trains biases (bias='all'), which a LoRA adapter cannot hold"),
    ],
)
def test_refusals_are_one_line_and_write_nothing(saved, tmp_path, capsys, case, message):
    root, _ = saved
    adapter, out = root / "pissa", tmp_path / "out"
    if case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "lora":
        adapter = tmp_path / "lora-adapter"
        from transformers import AutoModelForCausalLM

        get_peft_model(
            AutoModelForCausalLM.from_pretrained(root / "base"), LoraConfig(r=2, target_modules=["q_proj"])
        ).save_pretrained(adapter)
    elif case == "not-an-adapter":
        adapter = root / "base"
    elif case == "qpissa":
        adapter = tmp_path / "qpissa"
        adapter.mkdir()
        config = json.loads((root / "pissa" / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "residual_quantization": "nf4"}))
    elif case == "biases":  # an update with no exact LoRA form: the adapter trains biases
        from transformers import AutoModelForCausalLM

        adapter = tmp_path / "biases"
        config = PiSSAConfig(r=2, target_modules=TARGETS, bias="all", task_type="CAUSAL_LM")
        get_peft_model(AutoModelForCausalLM.from_pretrained(root / "base"), config).save_pretrained(adapter)
    before = sorted(os.listdir(out)) if out.exists() else None
    status, out_text, err = export(adapter, out, capsys=capsys)
    assert status == 1 and message in err, err
    assert len(err.strip().splitlines()) == 1 and out_text == ""
    assert (sorted(os.listdir(out)) if out.exists() else None) == before


@pytest.mark.slow  # the installed command, a second process
def test_the_console_script_exports(saved, tmp_path):
    root, _ = saved
    script = os.path.join(os.path.dirname(sys.executable), "subspace-peft")
    done = subprocess.run(
        [script, "export", str(root / "svfit"), str(tmp_path / "lora")], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
