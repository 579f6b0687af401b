"""Concrete Task Arithmetic in FusionBench's components and in subspace_peft, side by side on the same run.

The same body (Linear, tanh, LayerNorm, Linear; ``--hidden`` wide), three seeded fine-tunes with their heads, the same
unlabelled batches, ``--steps`` mask steps at FusionBench's settings (Adam 1e-3, lambda 0.3, logits from 0,
temperature 0.5). Each implementation runs ``--reps`` times in fresh processes, interleaved; the table shows medians.
Wall seconds cover the whole merge (task vectors, mask training, the final merged model); s/step is wall / steps.
Final entropy is the mean summed entropy of the last 10 steps (each run draws its own noise). The logits max diff
comes from one more pair of runs in this process with the SAME noise (FusionBench's draws recorded and replayed to
ours, tests/fusionbench_concrete.py): the largest difference of the trained mask logits, and of the merged
parameters for FusionBench's final sample.

    OMP_NUM_THREADS=1 python benchmarks/bench_concrete_reference.py            # 200 steps, median of 3
    OMP_NUM_THREADS=1 python benchmarks/bench_concrete_reference.py --steps 5 --reps 1 --out /tmp/check.json  # check

Needs FusionBench (see tests/test_reference_fusionbench.py for the install line). Writes
benchmarks/results/concrete_reference.json (``--out``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from importlib.metadata import version

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)

from fusionbench_concrete import NoiseTape, fusionbench_run, max_diff, ours_run, tiny_tasks  # noqa: E402
from harness import markdown_table, run_interleaved  # noqa: E402

METHODS = ("fusionbench", "subspace_peft")
LAST = 10  # steps averaged for the final entropy


def tasks(args):
    return tiny_tasks(inputs=args.inputs, hidden=args.hidden, features=args.features, batch=args.batch)


def one_run(method: str, args, tape=None, record_grads=False):
    base, tuned, heads, batches = tasks(args)
    if method == "fusionbench":
        with torch.random.fork_rng():
            torch.manual_seed(args.seed)
            return fusionbench_run(base, tuned, heads, batches, args.steps, tape=tape, record_grads=record_grads)
    return ours_run(base, tuned, heads, batches, args.steps, tape=tape, seed=args.seed, record_grads=record_grads)


def child(method: str, args) -> None:
    torch.set_num_threads(args.threads)
    run = one_run(method, args)
    tail = run.entropy[-LAST:]
    result = {
        "wall_s": run.seconds,
        "s_per_step": run.seconds / args.steps,
        "final_entropy": sum(tail) / len(tail),
        "first_entropy": run.entropy[0],
    }
    print("RESULT " + json.dumps(result), flush=True)


def same_noise(args) -> dict:
    """One pair with FusionBench's noise replayed to ours: how far the trained logits and merged models lie apart."""
    torch.set_num_threads(args.threads)
    tape = NoiseTape()
    reference = one_run("fusionbench", args, tape=tape)
    ours = one_run("subspace_peft", args, tape=tape)
    return {
        "logits_max_abs_diff": max_diff(reference.logits, ours.logits),
        "merged_state_max_abs_diff": max_diff(reference.model.state_dict(), ours.model.state_dict()),
        "entropy_max_abs_diff": max(abs(r - o) for r, o in zip(reference.entropy, ours.entropy)),
        "parameters": sum(v.numel() for v in reference.logits.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--out", default=os.path.join(HERE, "results", "concrete_reference.json"))
    parser.add_argument("--child", choices=METHODS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args)
        return

    shared = ("steps", "inputs", "hidden", "features", "batch", "seed", "threads")
    child_args = [f"--{name}={getattr(args, name)}" for name in shared]
    rows = run_interleaved(os.path.abspath(__file__), list(METHODS), args.reps, child_args)
    parity = same_noise(args)
    ratio = rows["fusionbench"]["wall_s"] / rows["subspace_peft"]["wall_s"]
    table = markdown_table(
        ["implementation", "wall s", "s/step", "final entropy", "logits max diff (same noise)"],
        [
            [
                method,
                f"{row['wall_s']:.3f}",
                f"{row['s_per_step'] * 1e3:.2f} ms",
                f"{row['final_entropy']:.5f}",
                "reference" if method == "fusionbench" else f"{parity['logits_max_abs_diff']:.2e}",
            ]
            for method, row in rows.items()
        ],
    )
    record = {
        "command": "python benchmarks/bench_concrete_reference.py " + " ".join(sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "out")},
        "masked_parameters": parity["parameters"],
        "medians": rows,
        "fusionbench_over_ours_wall": ratio,
        "same_noise": parity,
        "versions": {
            "fusion-bench": version("fusion-bench"),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    print(table)
    print(
        f"\n{parity['parameters']:,} masked parameters, {args.steps} steps, median of {args.reps} fresh processes, "
        f"{args.threads} thread(s). FusionBench / ours wall: {ratio:.2f}x. Same noise: merged parameters "
        f"{parity['merged_state_max_abs_diff']:.2e} apart, entropy {parity['entropy_max_abs_diff']:.2e}. "
        f"Written to {args.out}"
    )


if __name__ == "__main__":
    main()
