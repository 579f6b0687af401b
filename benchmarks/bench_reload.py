"""Reload time of a saved adapter, ours against peft's LoRA, on SmolLM2-135M (all-linear, r=16), through peft and
through transformers.

    python benchmarks/bench_reload.py [--reps 3] [--rank 16] [--paths peft transformers]

The adapters are made once (randomized init where a method has it) and saved. Each reload then runs in a fresh
process, as a user's first load does: load the fp32 base model, read every weight once (so its pages are resident),
run a full garbage collection (else a collection owed by loading the base model, ~0.3 s over its 500k Python
objects, falls on whichever call crosses the threshold), time one ``PeftModel.from_pretrained(base, folder)`` (each
``low_cpu_mem_usage`` value in its own process), and
count the calls of torch's
SVD / eigen / QR routines while it runs (0 for every method: a reload fills empty layers from the file). Methods are
interleaved over repetitions; the table gives medians and the ratio to LoRA's reload.

transformers' paths (``--paths transformers``), each in a fresh process that imports peft (so the start-up hook
registers our methods, as in any process that never runs ``import subspace_peft``) but not subspace_peft itself, and
times the call and the first forward pass (4 tokens), since our layers loaded by transformers finish themselves on
first use: ``base.load_adapter(folder)``, ``AutoModelForCausalLM.from_pretrained(folder)`` (base included) and
``pipeline("text-generation", model=folder)`` (base and tokenizer included).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from harness import markdown_table, run_interleaved  # noqa: E402

METHODS = ("lora", "pissa", "svfit", "effort", "flora")
DECOMPOSITIONS = {"linalg": ("svd", "svdvals", "eig", "eigh", "qr"), "torch": ("svd", "svd_lowrank")}
PEFT_PATHS = ("0", "1")  # PeftModel.from_pretrained without and with low_cpu_mem_usage
TRANSFORMERS_PATHS = ("load_adapter", "auto", "pipeline")


def make_config(method: str, rank: int):
    from peft import LoraConfig

    import subspace_peft

    if method == "lora":
        return LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear")
    if method == "pissa":
        return subspace_peft.PiSSAConfig(r=rank, lora_alpha=rank, target_modules="all-linear", init="randomized")
    if method == "svfit":
        return subspace_peft.SVFitConfig(r=rank, target_modules="all-linear", init="randomized")
    if method == "effort":
        return subspace_peft.EffortConfig(residual_rank=rank, target_modules="all-linear")
    return subspace_peft.FLoRAConfig(r=rank, target_modules="all-linear")


def load_base():
    import torch
    from transformers import AutoModelForCausalLM

    from models import smollm2_path

    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    for parameter in model.parameters():  # touch every page, as training would
        parameter.data.sum()
    return model


def save_adapters(root: str, rank: int) -> None:
    from peft import get_peft_model
    from transformers import AutoTokenizer

    from models import smollm2_path

    for method in METHODS:
        folder = os.path.join(root, method)
        if not os.path.exists(os.path.join(folder, "adapter_model.safetensors")):
            config = make_config(method, rank)
            config.task_type = "CAUSAL_LM"  # AutoModelForCausalLM / pipeline read it
            get_peft_model(load_base(), config).save_pretrained(folder)
            AutoTokenizer.from_pretrained(smollm2_path()).save_pretrained(folder)  # what a pipeline reads there
            print(f"saved {method}", file=sys.stderr, flush=True)


def count_decompositions() -> dict:
    """Wraps torch's (and scipy's) SVD / eigen / QR routines to count their calls."""
    import scipy.linalg
    import torch

    calls = {"n": 0}
    owners = ((torch.linalg, DECOMPOSITIONS["linalg"]), (torch, DECOMPOSITIONS["torch"]), (scipy.linalg, ("eigh",)))
    for owner, names in owners:
        for name in names:
            original = getattr(owner, name)

            def counted(*args, _original=original, **kwargs):
                calls["n"] += 1
                return _original(*args, **kwargs)

            setattr(owner, name, counted)
    return calls


def transformers_child(method: str, path: str, root: str) -> dict:
    """One load through transformers, and the first forward pass, in this process (subspace_peft never imported
    here: peft's import runs the start-up hook, before the clock starts)."""
    import peft  # noqa: F401
    import torch
    from transformers import AutoModelForCausalLM, pipeline

    calls = count_decompositions()
    folder = os.path.join(root, method)
    ids = torch.tensor([[1, 2, 3, 4]])
    base = load_base() if path == "load_adapter" else None
    gc.collect()
    start = time.perf_counter()
    if path == "load_adapter":
        base.load_adapter(folder)
        model = base
    elif path == "auto":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        model = pipeline("text-generation", model=folder, dtype=torch.float32).model
    with torch.no_grad():
        model(input_ids=ids)
    seconds = time.perf_counter() - start
    return {"reload_s": seconds, "decompositions": calls["n"], "adapter_mib": 0.0}


def child(variant: str, root: str) -> dict:
    """One reload (``METHOD:PATH``) in this fresh process: what a user's first load costs."""
    method, path = variant.split(":")
    if path in TRANSFORMERS_PATHS:
        return transformers_child(method, path, root)
    from peft import PeftModel

    import subspace_peft  # noqa: F401

    low_cpu_mem_usage = path
    calls = count_decompositions()
    base = load_base()
    gc.collect()  # a collection owed by loading the base model is not charged to the reload
    start = time.perf_counter()
    PeftModel.from_pretrained(base, os.path.join(root, method), low_cpu_mem_usage=low_cpu_mem_usage == "1")
    seconds = time.perf_counter() - start
    size = os.path.getsize(os.path.join(root, method, "adapter_model.safetensors")) / 2**20
    return {"reload_s": seconds, "decompositions": calls["n"], "adapter_mib": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--root", default=None, help="folder for the saved adapters (default: a temporary one)")
    parser.add_argument("--paths", nargs="+", choices=("peft", "transformers"), default=["peft", "transformers"])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.root)), flush=True)
        return
    root = args.root or tempfile.mkdtemp(prefix="bench_reload_")
    save_adapters(root, args.rank)
    paths = (PEFT_PATHS if "peft" in args.paths else ()) + (TRANSFORMERS_PATHS if "transformers" in args.paths else ())
    variants = [f"{method}:{path}" for method in METHODS for path in paths]
    rows = run_interleaved(os.path.abspath(__file__), variants, args.reps, ["--root", root])
    results = {"rank": args.rank, "reps": args.reps, "medians": rows}
    out = os.path.join(HERE, "results", "reload.json")
    with open(out, "w") as handle:
        json.dump(results, handle, indent=2)
    if "transformers" in args.paths:
        print_transformers_table(rows, args.rank, args.reps)
    if "peft" not in args.paths:
        return
    table = []
    for method in METHODS:
        plain, lcmu = rows[f"{method}:0"], rows[f"{method}:1"]
        table.append(
            [
                method,
                f"{plain['reload_s']:.2f}",
                f"{plain['reload_s'] / rows['lora:0']['reload_s']:.2f}x",
                f"{lcmu['reload_s']:.2f}",
                f"{lcmu['reload_s'] / rows['lora:1']['reload_s']:.2f}x",
                f"{plain['decompositions'] + lcmu['decompositions']:.0f}",
                f"{plain['adapter_mib']:.1f}",
            ]
        )
    print(f"SmolLM2-135M, all-linear, r={args.rank}, medians of {args.reps} fresh processes (one reload each)")
    print(
        markdown_table(
            [
                "method",
                "reload s",
                "/ LoRA",
                "reload s (low_cpu_mem_usage)",
                "/ LoRA",
                "SVD/eigen/QR calls",
                "adapter MiB",
            ],
            table,
        )
    )


def print_transformers_table(rows: dict, rank: int, reps: int) -> None:
    table = []
    for method in METHODS:
        cells = [method]
        for path in TRANSFORMERS_PATHS:
            seconds = rows[f"{method}:{path}"]["reload_s"]
            cells += [f"{seconds:.2f}", f"{seconds / rows[f'lora:{path}']['reload_s']:.2f}x"]
        cells.append(f"{sum(rows[f'{method}:{path}']['decompositions'] for path in TRANSFORMERS_PATHS):.0f}")
        table.append(cells)
    print(
        f"transformers' paths, SmolLM2-135M, all-linear, r={rank}: load + first forward (4 tokens), medians of {reps} "
        "fresh processes that never import subspace_peft"
    )
    headers = ["method", "load_adapter s", "/ LoRA", "AutoModelForCausalLM(folder) s", "/ LoRA", "pipeline s", "/ LoRA"]
    print(markdown_table([*headers, "SVD/eigen/QR calls"], table))


if __name__ == "__main__":
    main()
