"""FSDP2 over a 4-bit base (QLoRA and QPiSSA, nf4 stored as float32) on CPU through torchrun and gloo: the 4-bit
weights are sharded, training runs, and the saved adapter reloaded in one process reproduces the sharded model."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from test_finetune_recipe import tiny_model  # noqa: F401  (fixture)
from test_fsdp2 import run_two_ranks

pytestmark = pytest.mark.slow  # torchrun / several processes

pytest.importorskip("bitsandbytes")
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(TESTS_DIR), "recipes"))


@pytest.mark.parametrize(
    "method, dtype, mixed_precision, atol",
    [
        ("lora", "float32", "no", 1e-4),
        ("pissa", "float32", "no", 1e-4),
        ("lora", "bfloat16", "bf16", 1e-2),  # bf16 logits of magnitude ~1 (measured 0.004): a few bf16 ulps
    ],
)
def test_fsdp2_over_a_4bit_base_trains_and_its_adapter_reloads(
    method,
    dtype,
    mixed_precision,
    atol,
    tiny_model,  # noqa: F811
    tmp_path,
):
    from peft import PeftModel

    from finetune import FinetuneRecipe, keep_4bit_layers_on_the_training_path, load_model

    proc = run_two_ranks("fsdp_quantized_worker.py", method, tiny_model, str(tmp_path), dtype, mixed_precision)
    for rank in (0, 1):  # each rank holds half of the quantised base
        assert f"RANK {rank} HOLDS 0.500 OF THE 4-BIT WEIGHTS" in proc.stdout, proc.stdout[-2000:]

    # reload as a user would: QLoRA onto the 4-bit base, QPiSSA onto the full-precision base (it re-quantises)
    quantization = "4bit" if method == "lora" else "none"
    base, _ = load_model(FinetuneRecipe(model=tiny_model, method=method, quantization=quantization, dtype=dtype))
    model = PeftModel.from_pretrained(base, tmp_path)
    keep_4bit_layers_on_the_training_path(model)
    sharded = torch.load(tmp_path / "probe.pt")
    with torch.no_grad():
        logits = model(input_ids=sharded["probe"]).logits
        with model.disable_adapter():
            untrained = model(input_ids=sharded["probe"]).logits
    assert (sharded["logits"] - untrained).abs().max() > 1e-3, "training must have moved the adapter"
    assert torch.allclose(logits.float(), sharded["logits"].float(), rtol=0, atol=atol)


@pytest.mark.parametrize(
    "quantization, dtype, mixed_precision, refused",
    [
        ("4bit", "float32", "bf16", True),
        ("4bit", "float32", "fp16", True),
        ("4bit", "bfloat16", "bf16", False),
        ("4bit", "float32", "no", False),
        ("none", "float32", "bf16", False),
    ],
)
def test_fsdp_mixed_precision_must_match_the_4bit_storage(quantization, dtype, mixed_precision, refused):
    from finetune import FinetuneRecipe, fsdp_storage_mismatch

    recipe = FinetuneRecipe(method="lora", quantization=quantization, dtype=dtype)
    problem = fsdp_storage_mismatch(recipe, mixed_precision)
    assert (problem is not None) == refused
    if refused:
        assert "--dtype" in problem
