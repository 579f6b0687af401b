"""The scripts in examples/ run (each in its own process, at small settings) and show what they claim, read from the
JSON object each prints as its last line; a fast test checks that every script has a test here and stays short."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys

import pytest

from subspace_peft.packaged_models import smollm2_missing

from fake_hub import FakeHub

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
MAX_LINES = 110  # an example is read and copied whole: ~100 lines, with a little slack

_missing = smollm2_missing()
needs_smollm2 = pytest.mark.skipif(_missing is not None, reason=f"needs the packaged SmolLM2-135M: {_missing}")


def run_example(script: str, *args: str, env: dict | None = None, timeout: int = 600) -> dict:
    """Runs ``examples/<script>`` with ``args`` (offline unless ``env`` says otherwise); returns its last line, a
    JSON object, after checking the script exited 0 and reported ``ok``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] is True, result
    return result


def test_every_example_has_a_test_that_runs_it_and_stays_short():
    scripts = sorted(name for name in os.listdir(EXAMPLES) if name.endswith(".py"))
    assert scripts, "no examples found"
    tree = ast.parse(open(__file__, encoding="utf-8").read())
    tested = {}
    for function in (node for node in tree.body if isinstance(node, ast.FunctionDef)):
        slow = any("slow" in ast.unparse(decorator) for decorator in function.decorator_list)
        for call in (node for node in ast.walk(function) if isinstance(node, ast.Call)):
            if isinstance(call.func, ast.Name) and call.func.id == "run_example" and call.args:
                if isinstance(call.args[0], ast.Constant):
                    tested[call.args[0].value] = (function.name, slow)
    for script in scripts:
        assert script in tested, f"examples/{script} has no test in tests/test_examples.py that runs it (run_example)"
        assert tested[script][1], f"{tested[script][0]} runs examples/{script} but is not marked slow"
        with open(os.path.join(EXAMPLES, script), encoding="utf-8") as handle:
            lines = len(handle.read().splitlines())
        assert lines <= MAX_LINES, f"examples/{script} has {lines} lines (at most {MAX_LINES})"
    assert set(tested) <= set(scripts), f"tests run examples that do not exist: {set(tested) - set(scripts)}"


@pytest.mark.slow
@needs_smollm2
def test_pissa_sft_chat(tmp_path):
    result = run_example("pissa_sft_chat.py", "--steps", "4", "--rank", "4", "--output-dir", str(tmp_path))
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert result["eval_loss_after"] < result["eval_loss_before"]
    assert result["reload_max_abs_diff"] <= 1e-4  # PeftModel.from_pretrained on a fresh base: the same logits
    assert isinstance(result["answer"], str) and result["answer"]


@pytest.mark.slow
@needs_smollm2
def test_qpissa_4bit():
    result = run_example("qpissa_4bit.py", "--steps", "2", "--rank", "4")
    assert result["qpissa_error"] < result["qlora_error"]  # the principal part is kept out of the quantisation
    assert result["loss_after"] < result["loss_before"]
    assert result["reload_max_abs_diff"] <= 1e-4  # the reload quantises the same residual again


@pytest.mark.slow
def test_svfit_classification():
    result = run_example("svfit_classification.py", "--steps", "25")
    assert result["accuracy_after"] >= 0.75 and result["accuracy_after"] > result["accuracy_before"]
    assert 0 < result["svfit_values"] < result["trainable"]  # singular values, plus the classifier head


@pytest.mark.slow
def test_flora_conv():
    result = run_example("flora_conv.py", "--pretrain-steps", "120", "--steps", "80")
    assert result["pretrained_red"] >= 0.9  # the base learnt the pretraining task
    assert result["after"] >= result["before"] + 0.2  # FLoRA on the convolutions learnt the shifted one
    assert result["merge_max_abs_diff"] <= 1e-4


@pytest.mark.slow
@needs_smollm2
def test_effort_trl():
    result = run_example("effort_trl.py", "--steps", "4")
    assert result["logged"]  # effort_loss, effort_orth and effort_norm in every training log entry
    last = result["last_log"]
    assert all(math.isfinite(last[key]) and last[key] >= 0 for key in ("effort_loss", "effort_orth", "effort_norm"))
    assert result["eval_loss_after"] < result["eval_loss_before"]


@pytest.mark.slow
def test_merge_adapters():
    result = run_example("merge_adapters.py", "--steps", "25", "--concrete-steps", "5")
    mean = result["mean"]
    assert set(mean) == {"individual adapters", "base encoder", "task arithmetic", "TIES", "Concrete AdaMerging"}
    assert mean["individual adapters"] >= 0.8
    for method in ("task arithmetic", "TIES", "Concrete AdaMerging"):  # every merge keeps some of each adapter
        assert mean[method] > mean["base encoder"], method


@pytest.mark.slow
@needs_smollm2
def test_streaming_init():
    result = run_example("streaming_init.py", "--rank", "4", "--steps", "2", "--shard-size", "50MB")
    assert result["max_relative_difference"] <= 1e-6 and result["same_config"]  # the get_peft_model adapter
    assert result["losses"][-1] < result["losses"][0]


@pytest.mark.slow
def test_push_and_load(tmp_path):
    with FakeHub() as hub:
        env = hub.env(dict(os.environ, HF_HOME=str(tmp_path / "hf")))
        result = run_example("push_and_load.py", "--repo-id", "user/tiny-pissa", "--steps", "3", env=env)
        assert "lora/adapter_model.safetensors" in hub.repos.files["user/tiny-pissa"]
    assert not result["subspace_peft_imported"] and result["peft_type"] == "LORA"
    assert result["max_abs_diff"] <= 1e-5  # the plain-LoRA export gives the pushed model's logits
    assert result["adapter_effect"] > 1e-3  # ... which differ from the base model's
    assert {"README.md", "adapter_model.safetensors", "lora/adapter_config.json"} <= set(result["files"])
