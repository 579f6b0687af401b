"""FSDP2 (fully_shard) on CPU through torchrun and gloo: every method trains a few steps and saves an adapter that
loads onto a fresh base."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow  # torchrun / several processes

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


METHODS = ["lora", "pissa", "svfit", "flora", "effort"]


def method_config(method: str):
    from peft import LoraConfig

    import subspace_peft

    return {
        "lora": lambda: LoraConfig(r=2, target_modules="all-linear"),
        "pissa": lambda: subspace_peft.PiSSAConfig(r=2, target_modules="all-linear"),
        "svfit": lambda: subspace_peft.SVFitConfig(r=2, target_modules="all-linear"),
        "flora": lambda: subspace_peft.FLoRAConfig(r=2, target_modules="all-linear"),
        # weights 1, not the default 1e4: under these tests' plain SGD at rate 0.5 the default's regulariser steps are
        # so large that the run is chaotic (a 1e-7 change of the initial adapter changed the result by 1e9 relative
        # at weight 30, batched and per-layer terms bitwise equal), so distributed and one-process runs could not agree
        "effort": lambda: subspace_peft.EffortConfig(target_modules="all-linear", orth_weight=1.0, norm_weight=1.0),
    }[method]()


def run_two_ranks(worker: str, method: str, *args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 tests/WORKER METHOD ARGS...``; asserts rank 0 printed
    ``SAVED METHOD`` and the run ended cleanly."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", os.path.join(TESTS_DIR, worker), method, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    saved = f"SAVED {method}" in proc.stdout
    # gloo's teardown on CPU aborted about 1 run in 10 after the work was done ("terminate called without an active
    # exception" at process exit); what the tests check is the training and the saved adapter
    teardown_abort = "terminate called without an active exception" in proc.stderr
    assert proc.returncode == 0 or (saved and teardown_abort), proc.stderr[-3000:]
    assert saved, proc.stdout[-2000:]
    return proc


@pytest.mark.parametrize("method", METHODS)
def test_fsdp2_trains_and_saves_an_adapter_that_loads(method, tmp_path):
    from peft import PeftModel

    import subspace_peft  # noqa: F401

    proc = run_two_ranks("fsdp2_worker.py", method, str(tmp_path))
    if method == "effort":
        assert "REGULARISER_PASSES 3 ['loss', 'norm', 'orth']" in proc.stdout
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            original = model(input_ids=ids).logits
    assert torch.isfinite(adapted).all()
    assert (adapted - original).abs().max() > 1e-4, "the saved adapter must carry the trained update"
