"""push_adapter pushes the exact plain-LoRA export beside the native adapter, and the model card follows the Hub's
conventions and says how to serve it."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import save_file

from subspace_peft import FLoRAConfig, PiSSAConfig
from subspace_peft.hub import model_card, push_adapter

from fake_hub import FakeHub
from parity import run_python
from tiny_models import build, inputs, output_tensor

TOKEN = "hf_fake_token_for_tests"


def trained_pissa():
    model = get_peft_model(build("mlp"), PiSSAConfig(r=3, target_modules=["lin0", "lin1"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    return model.eval()


@pytest.mark.slow  # a second process (tests/test_parity.py loads every export without this package by default)
@pytest.mark.timeout(300)
def test_the_lora_export_is_pushed_and_loads_in_plain_peft_without_this_package(tmp_path):
    model = trained_pissa()
    with torch.no_grad():
        save_file({"out": output_tensor(model(**inputs("mlp"))).contiguous()}, str(tmp_path / "expected.safetensors"))
    with FakeHub() as hub:
        push_adapter(model, "user/pissa", token=TOKEN, endpoint=hub.endpoint, timeout=10, max_retries=1)
        files = hub.repos.files["user/pissa"]
        assert {"adapter_model.safetensors", "lora/adapter_config.json", "lora/adapter_model.safetensors"} <= set(files)
        card = files["README.md"].decode()
        assert 'PeftModel.from_pretrained(base, "user/pissa", subfolder="lora")' in card
        assert "--max-lora-rank 6" in card  # PiSSA exports exactly at rank 2r
        code = f"""
import sys, torch
from peft import PeftModel
from safetensors.torch import load_file
from tiny_models import build, inputs, output_tensor
model = PeftModel.from_pretrained(build("mlp"), "user/pissa", subfolder="lora")
assert "subspace_peft" not in sys.modules, "the export must load without subspace_peft"
with torch.no_grad():
    out = output_tensor(model(**inputs("mlp")))
ref = load_file({str(tmp_path / "expected.safetensors")!r})["out"]
print("ERR", float((out - ref).abs().max() / ref.abs().max()))
"""
        env = hub.env(dict(os.environ, HF_HOME=str(tmp_path / "hf")))
        env = {k: v for k, v in env.items() if k.startswith("HF_")}
        # as on a machine without this package: installed, it registers itself whenever peft is imported
        out = run_python(code, env={**env, "SUBSPACE_PEFT_AUTOREGISTER": "0"})
    assert float(next(line for line in out.splitlines() if line.startswith("ERR")).split()[1]) <= 1e-5


def test_export_none_pushes_the_native_adapter_alone_and_a_method_without_exact_lora_says_so():
    grouped = get_peft_model(build("grouped"), FLoRAConfig(r=1, target_modules=["depthwise"]))
    with FakeHub() as hub:
        with pytest.raises(ValueError, match=r"grouped convolution.*pass export=None"):
            push_adapter(grouped, "user/flora", token=TOKEN, endpoint=hub.endpoint, timeout=10, max_retries=0)
        push_adapter(grouped, "user/flora", token=TOKEN, endpoint=hub.endpoint, timeout=10, max_retries=0, export=None)
        files = set(hub.repos.files["user/flora"])
    assert "adapter_model.safetensors" in files and not any(name.startswith("lora/") for name in files)
    with pytest.raises(ValueError, match=r"export must be one of 'lora', None"):
        push_adapter(grouped, "user/flora", token=TOKEN, endpoint="http://127.0.0.1:9", export="dora")


def test_card_metadata_follows_the_hub_conventions():
    model = trained_pissa()
    config = model.peft_config["default"]
    config.base_model_name_or_path, config.task_type = "HuggingFaceTB/SmolLM2-135M-Instruct", "CAUSAL_LM"
    card = model_card(model, "me/pissa")
    for line in (
        "library_name: peft",
        "pipeline_tag: text-generation",
        "base_model: HuggingFaceTB/SmolLM2-135M-Instruct",
        "- base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct",
        "- pissa",
        "- subspace-peft",
    ):
        assert line in card, line
    config.base_model_name_or_path = "/data/models/local-copy"  # a local path is no Hub id: no adapter tag for it
    assert "base_model:adapter:" not in model_card(model, "me/pissa")


def test_a_qpissa_adapter_is_pushed_without_an_export_that_would_not_fit_the_original_base():
    pytest.importorskip("bitsandbytes")
    from tiny_models import MLP

    torch.manual_seed(0)
    base = MLP()
    base.lin0, base.lin1 = torch.nn.Linear(10, 64), torch.nn.Linear(64, 64)
    base.lin2 = torch.nn.Linear(64, 3)
    model = get_peft_model(base, PiSSAConfig(r=2, target_modules=["lin1"], residual_quantization="nf4"))
    with FakeHub() as hub:
        with pytest.warns(UserWarning, match=r"no lora/ export for a QPiSSA adapter"):
            push_adapter(model, "user/qpissa", token=TOKEN, endpoint=hub.endpoint, timeout=10, max_retries=0)
        files = set(hub.repos.files["user/qpissa"])
    assert "adapter_model.safetensors" in files and not any(name.startswith("lora/") for name in files)


def test_a_local_base_model_is_refused_before_anything_is_sent_unless_base_model_names_the_hub_id(tmp_path):
    model = trained_pissa()
    config = model.peft_config["default"]
    config.base_model_name_or_path, config.task_type = str(tmp_path / "smollm2-local-copy"), "CAUSAL_LM"
    with FakeHub() as hub:
        with pytest.raises(ValueError, match=r"local path .*smollm2-local-copy.* Pass base_model='<hub id>'"):
            push_adapter(model, "user/pissa", token=TOKEN, endpoint=hub.endpoint, timeout=10, max_retries=0)
        assert "user/pissa" not in hub.repos.files  # refused before the repo was created
        for bad in ("/abs/path", "a/b/c", ""):
            with pytest.raises(ValueError, match="base_model must be a Hub model id"):
                push_adapter(model, "user/pissa", token=TOKEN, endpoint=hub.endpoint, base_model=bad)
        with pytest.raises(ValueError, match="datasets must be a list of Hub dataset ids"):
            push_adapter(
                model, "user/pissa", token=TOKEN, endpoint=hub.endpoint, base_model="org/base", datasets="openai/gsm8k"
            )
        push_adapter(
            model,
            "user/pissa",
            token=TOKEN,
            endpoint=hub.endpoint,
            timeout=10,
            max_retries=0,
            base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
            license="apache-2.0",
            datasets=["openai/gsm8k"],
        )
        files = hub.repos.files["user/pissa"]
    card = files["README.md"].decode()
    for line in (
        "base_model: HuggingFaceTB/SmolLM2-135M-Instruct",
        "license: apache-2.0",
        "- openai/gsm8k",
        "- base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct",
        'AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")',
    ):
        assert line in card, line
    assert "smollm2-local-copy" not in card
    for name in ("adapter_config.json", "lora/adapter_config.json"):
        saved = json.loads(files[name])
        assert saved["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct", name
    assert config.base_model_name_or_path == str(tmp_path / "smollm2-local-copy")  # the user's config is untouched
