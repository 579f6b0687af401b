"""Training step time and peak memory of our methods against PEFT LoRA on SmolLM2-135M, at matched target modules.

    python benchmarks/bench_step.py [--methods lora pissa svfit effort flora] [--targets all-linear|attention]
                                    [--rank 16] [--effort-rank 1] [--steps 12] [--reps 3]

Each (method, repetition) runs in a fresh process: load the fp32 model, wrap it (r=16 for LoRA, PiSSA and SVFit;
Effort trains ``--effort-rank`` minor components, the paper's 1 by default, with both of its losses on), then time
AdamW steps on a fixed random batch (4 x 128 tokens) after 2 warm-up steps. Step time is the median step of a
process, reported as the median over processes; peak RSS is VmHWM reset after wrapping (Linux only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


TARGETS = {"all-linear": "all-linear", "attention": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def make_config(method: str, rank: int, targets: str, effort_rank: int):
    from peft import LoraConfig

    import subspace_peft

    target_modules = TARGETS[targets]
    if method == "lora":
        return LoraConfig(r=rank, lora_alpha=rank, target_modules=target_modules)
    if method == "pissa":
        return subspace_peft.PiSSAConfig(r=rank, lora_alpha=rank, target_modules=target_modules, init="randomized")
    if method == "svfit":
        return subspace_peft.SVFitConfig(r=rank, target_modules=target_modules, init="randomized")
    if method == "flora":
        return subspace_peft.FLoRAConfig(r=rank, target_modules=target_modules)
    if method == "effort":
        # exact SVD (minor components); the cache makes every process after the first skip it
        return subspace_peft.EffortConfig(residual_rank=effort_rank, target_modules=target_modules, svd_cache=True)
    raise ValueError(f"unknown method {method!r}")


def run(method: str, steps: int, rank: int, targets: str = "all-linear", effort_rank: int = 1) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from bench_init import _vm_hwm_kib
    from harness import reset_peak_rss, timed_steps
    from models import smollm2_path

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32),
                           make_config(method, rank, targets, effort_rank))
    model.train()
    batch = torch.randint(0, 49152, (4, 128), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    reset_peak_rss()
    start_mib = _vm_hwm_kib() / 1024

    def step():
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_s = timed_steps(step, steps)
    return {
        "step_s": step_s,
        "peak_mib": _vm_hwm_kib() / 1024,
        "start_mib": start_mib,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["lora", "pissa", "svfit", "effort", "flora"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--effort-rank", type=int, default=1)
    parser.add_argument("--targets", choices=sorted(TARGETS), default="all-linear")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run(args.child, args.steps, args.rank, args.targets, args.effort_rank)))
        return

    from harness import print_table, run_interleaved
    from models import smollm2_path

    smollm2_path()
    child_args = ["--steps", str(args.steps), "--rank", str(args.rank), "--targets", args.targets,
                  "--effort-rank", str(args.effort_rank)]
    rows = run_interleaved(__file__, args.methods, args.reps, child_args)
    print(f"\nSmolLM2-135M fp32, {args.targets}, r={args.rank} (Effort: {args.effort_rank}), batch 4x128, AdamW; "
          f"median of {args.reps} processes\n")
    print_table(rows, "lora")


if __name__ == "__main__":
    main()
