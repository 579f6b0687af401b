"""Every command README.md shows runs as written, and a test runs it: `make demo` (a few steps), `make test` (what
.ci/run runs), the accelerate recipe (tests/test_recipe_cli.py), and the Python quickstart (against the loopback fake
Hub). A command added to the README without a test here fails the first test."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from subspace_peft.packaged_models import smollm2_missing

from fake_hub import FakeHub
from readme_commands import ROOT, makefile_recipe, readme_python_blocks, readme_shell_commands

# each README command and the test that runs it
RUN_BY = {
    "make demo": "tests/test_readme_commands.py::test_make_demo_runs_the_default_recipe_and_says_where_it_went",
    "make test": ".ci/run (tests/test_readme_commands.py::test_ci_runs_the_readme_test_command)",
    "accelerate launch recipes/finetune.py --config recipes/configs/effort.yaml --max_steps 300": (
        "tests/test_recipe_cli.py::test_the_readme_accelerate_command_runs_as_written"
    ),
    (
        "lm_eval --model hf --model_args pretrained=BASE,peft=ADAPTER,dtype=float32 --tasks subspace_peft_arithmetic "
        "--include_path tests/lm_eval_task --device cpu --batch_size 8"
    ): "tests/test_lm_eval.py::test_lm_eval_evaluates_every_method_as_its_merged_model_without_the_import",
}
PYTHON_BLOCKS = 1  # the quickstart: tests/test_readme_commands.py::test_the_python_quickstart_runs_as_written


def test_every_readme_command_is_run_by_a_test():
    assert [" ".join(words) for words in readme_shell_commands()] == list(RUN_BY)
    assert len(readme_python_blocks()) == PYTHON_BLOCKS


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as handle:
        ci = [line.split() for line in handle.read().splitlines() if line.strip() and not line.startswith("#")]
    assert any(words[0] == "make" and "test" in words[1:] for words in ci), ci
    assert makefile_recipe("test") == ["$(PY) -m pytest -q $(ARGS)"]


def needs_smollm2():
    if smollm2_missing():
        pytest.skip(f"the packaged SmolLM2 is not installed: {smollm2_missing()}")


@pytest.mark.slow  # SmolLM2, a few steps (about a minute)
def test_make_demo_runs_the_default_recipe_and_says_where_it_went(tmp_path):
    needs_smollm2()
    out = tmp_path / "run"
    args = f"--max_steps 3 --eval_size 16 --output_dir {out}"
    # the virtualenv running the tests is the one make uses: set up already, so make runs the recipe
    proc = subprocess.run(
        ["make", "demo", f"VENV={sys.prefix}", f"ARGS={args}"], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["method"], metrics["steps"]) == ("pissa", 3)
    adapter = out / "adapter"
    report = proc.stdout[proc.stdout.index("output folder:") :]
    assert f"output folder: {out}" in report and f"adapter:       {adapter}" in report
    assert "holds the last step's (step 3;" in report
    before, after = metrics["before"], metrics["after"]
    assert f"eval loss:     {before['eval_loss']:.4f} -> {after['eval_loss']:.4f}" in report
    assert f"exact match:   {before['exact_match']:.3f} -> {after['exact_match']:.3f}" in report
    load = [line.strip() for line in report.splitlines()[report.splitlines().index("load it:") + 1 :]][:3]
    assert load == [
        "import subspace_peft  # registers the method with peft",
        "from peft import AutoPeftModelForCausalLM",
        f'model = AutoPeftModelForCausalLM.from_pretrained("{adapter}")',
    ]
    card = (adapter / "README.md").read_text()
    for expected in (
        "base_model: HuggingFaceTB/SmolLM2-135M-Instruct",
        "PiSSA",
        "eval loss before / after",
        "import subspace_peft",
    ):
        assert expected in card, expected
    assert "More Information Needed" not in card
    # the three lines load it, in a fresh process, with outputs equal to the run's own adapter
    code = "\n".join(load) + "\nprint('LOADED', type(model).__name__, model.peft_config['default'].peft_type.value)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert "LOADED PeftModelForCausalLM PISSA" in loaded.stdout, loaded.stderr[-3000:]


@pytest.mark.slow  # SmolLM2: an exact SVD of its 210 linear layers, a save, an export and a push
def test_the_python_quickstart_runs_as_written(tmp_path):
    needs_smollm2()
    (block,) = readme_python_blocks()
    with FakeHub() as hub:
        env = hub.env({**os.environ, "HF_HOME": str(tmp_path / "hf")})
        proc = subprocess.run(
            [sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        pushed = set(hub.repos.files["me/my-adapter"])
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "lora/adapter_config.json"} <= pushed
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()
    exported = json.loads((tmp_path / "my-adapter-lora" / "adapter_config.json").read_text())
    assert exported["peft_type"] == "LORA" and exported["r"] == 32  # PiSSA exports exactly at rank 2r
