"""Concrete AdaMerging against AdaMerging (task-wise) and TIES, per seed, at FusionBench's settings, on the fine-tunes
and splits of bench_concrete_ta.py (bench_merge.py's three MiniLM tasks; the fine-tunes are read from its ``--cache``).

    pip install -e ".[bench]"
    python benchmarks/bench_concrete_adamerging.py [--seeds 0 1 2] [--mask-steps 1000] [--lambda-steps 1000] [--quick]

FusionBench's ``clip_concrete_task_wise_adamerging`` and ``adamerging`` settings: lambdas start at 0.3 and learn at
Adam lr 1e-3; Concrete AdaMerging's mask logits start at 0, temperature 0.5, with its inner lambda step at lr 1
(``base_lr``), ``--mask-steps`` mask steps then ``--lambda-steps`` lambda steps with the mask fixed, the returned model
a Concrete sample of the logits; AdaMerging ``--lambda-steps`` steps. The mask learns at ``--mask-lr`` (1e-4, the
Concrete paper's text runs, as bench_concrete_ta.py's reference setting) over the encoder's blocks. Each step sees
16 unlabeled test inputs per task, reshuffled every pass. The seed draws the Concrete noise, the returned sample and
the order of the unlabeled batches; TIES (lambda 1, density 0.2, bench_merge.py's) is deterministic, run once. Per
run: test accuracy per task and on average with per-example correctness (claims.py pairs the methods by seed and
test example), lambdas, steps, seconds. Results are written after every run to concrete_adamerging.json and .md
(``--out``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_concrete_ta  # noqa: E402
import bench_merge  # noqa: E402
from harness import markdown_table, write_report  # noqa: E402

SETTINGS = {"lambda_lr": 1e-3, "inner_lambda_lr": 1.0, "scaling": 0.3, "temperature": 0.5, "batch": 16}
LABELS = {
    "concrete_adamerging": "Concrete AdaMerging (task-wise)",
    "adamerging": "AdaMerging (task-wise)",
    "ties": "TIES (lambda 1, density 0.2)",
}


def merge_run(method: str, seed: int, args, base, tokenizer, data, heads, vectors, test) -> dict:
    """One learned merge (``concrete_adamerging`` or ``adamerging``) at ``seed``, scored on the test splits."""
    from subspace_peft import merging

    names = list(data)
    unlabeled = bench_concrete_ta.unlabeled_inputs(tokenizer, data, {"batch": SETTINGS["batch"], "shuffle": True}, seed)
    logits_fns = [lambda model, batch, head=heads[n]: bench_merge.head_logits(head, model, batch) for n in names]
    started = time.perf_counter()
    if method == "concrete_adamerging":
        result = merging.concrete_merge(
            base,
            vectors,
            unlabeled,
            logits_fns,
            method="adamerging",
            scaling=SETTINGS["scaling"],
            steps=args.mask_steps,
            lr=args.mask_lr,
            lambda_lr=SETTINGS["lambda_lr"],
            inner_lambda_lr=SETTINGS["inner_lambda_lr"],
            adamerging_steps=args.lambda_steps,
            temperature=SETTINGS["temperature"],
            seed=seed,
            modules=args.mask_modules,
            final_mask="sample",
            progress=False,
        )
        steps = {"mask": len(result.entropy), "lambda": len(result.adamerging_entropy)}
    else:
        result = merging.adamerging(
            base,
            vectors,
            unlabeled,
            logits_fns,
            lambda_granularity="task",
            scaling=SETTINGS["scaling"],
            steps=args.lambda_steps,
            lambda_lr=SETTINGS["lambda_lr"],
            progress=False,
        )
        steps = {"lambda": len(result.entropy)}
    seconds = time.perf_counter() - started
    return {
        "method": method,
        "seed": seed,
        "steps": steps,
        "seconds": round(seconds, 1),
        "lambdas": [round(x, 4) for x in result.lambdas.flatten().tolist()],
        **bench_concrete_ta.summary(bench_concrete_ta.evaluate(result.model, heads, test), seed),
    }


def markdown(report: dict) -> str:
    names = report["tasks"]
    rows = [
        [LABELS[run["method"]], run["seed"] if run["seed"] is not None else "-"]
        + [f"{run['accuracy'][n]:.3f}" for n in names]
        + [f"{run['average']:.3f}", ", ".join(f"{k} {v}" for k, v in run["steps"].items()) or "-"]
        + [" ".join(f"{x:.2f}" for x in run["lambdas"]) or "-", f"{run['seconds']:.0f}"]
        for run in report["runs"]
    ]
    table = markdown_table(["merge", "seed", *names, "average", "steps", "lambdas", "s"], rows)
    return f"`{report['command']}` ({report['wall_seconds'] / 60:.1f} min)\n\nTest accuracy:\n\n{table}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=("concrete_adamerging", "adamerging"), default=None)
    parser.add_argument("--mask-steps", type=int, default=1000, help="Concrete AdaMerging's mask steps (FusionBench)")
    parser.add_argument("--lambda-steps", type=int, default=1000, help="lambda steps of both (FusionBench)")
    parser.add_argument("--mask-lr", type=float, default=1e-4)
    parser.add_argument("--fine-tune-steps", type=int, default=150)
    parser.add_argument("--validation-per-task", type=int, default=64)
    parser.add_argument("--mask-modules", nargs="*", default=["encoder"])
    parser.add_argument("--out", default=None)
    parser.add_argument("--cache", default=os.path.join("runs", "bench_concrete_ta"), help="bench_concrete_ta's")
    parser.add_argument("--quick", action="store_true", help="smoke test: 10 fine-tuning, 4 mask and 4 lambda steps")
    args = parser.parse_args()
    if args.quick:
        args.fine_tune_steps, args.mask_steps, args.lambda_steps, args.cache = 10, 4, 4, ""
    out = args.out or (os.path.join(tempfile.gettempdir(), "bench_concrete_adamerging_quick") if args.quick else None)
    out = out or os.path.join(HERE, "results")
    started = time.perf_counter()
    from subspace_peft import merging

    base, tokenizer, data, heads, encoders = bench_concrete_ta.prepare(args)
    names = list(data)
    vectors = [merging.task_vector(base, encoders[n]) for n in names]
    test = {n: bench_merge.batches(tokenizer, data[n]["test"], 64) for n in names}
    ties = merging.ties_merging(base, vectors, 1.0, 0.2)
    runs = [
        {
            "method": "ties",
            "seed": None,
            "steps": {},
            "seconds": 0.0,
            "lambdas": [],
            **bench_concrete_ta.summary(bench_concrete_ta.evaluate(ties, heads, test), 0),
        }
    ]
    report = {
        "command": "python benchmarks/bench_concrete_adamerging.py " + " ".join(sys.argv[1:]),
        "settings": {**{k: v for k, v in vars(args).items() if k != "out"}, **SETTINGS},
        "tasks": names,
        "runs": runs,
        "torch_threads": torch.get_num_threads(),
    }
    for seed in args.seeds:
        for method in args.methods or ("concrete_adamerging", "adamerging"):
            runs.append(merge_run(method, seed, args, base, tokenizer, data, heads, vectors, test))
            print(f"{method}, seed {seed}: {runs[-1]['average']:.3f} in {runs[-1]['seconds']:.0f} s", flush=True)
            report["wall_seconds"] = round(time.perf_counter() - started, 1)
            text = markdown(report)
            write_report(out, "concrete_adamerging", report, text)  # after every run: a long run keeps what it has
    print(text)


if __name__ == "__main__":
    main()
