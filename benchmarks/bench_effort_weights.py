"""Effort's loss weights on the quality benchmark: fit, forgetting and the regulariser's share of the loss for each
(orth_weight, norm_weight), everything else as in bench_quality.py (SmolLM2-135M-Instruct, AFINN-165 word valence,
all linear layers, 16 minor components, AdamW at ``--lr``, batch 8, ``--steps`` steps).

    python benchmarks/bench_effort_weights.py [--weights 1,1 1e3,1 1e4,1 1,1e3] [--lr 1e-3] [--steps 80]

Each pair trains and is evaluated in its own process (about 3 minutes each on 2 cores, alone). The share is the
weighted regulariser over (task loss + regulariser), mean over the first, middle and last 10 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def run_pair(orth: float, norm: float, lr: float, steps: int, run_dir: str) -> dict:
    import bench_quality

    recipe_of = bench_quality.method_recipe

    def weighted(method: str):
        recipe = recipe_of(method)
        recipe.method_config = {**recipe.method_config, "orth_weight": orth, "norm_weight": norm}
        return recipe

    bench_quality.method_recipe = weighted
    result = bench_quality.train("effort", lr, steps, run_dir)
    result.update(bench_quality.evaluate("effort", run_dir))
    result["share"] = bench_quality.regulariser_share(result)
    return {key: value for key, value in result.items() if key not in ("train_losses", "regulariser")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", nargs="+", default=["1,1", "1e2,1", "1e3,1", "3e3,1", "1e4,1", "1,1e2", "1,1e3"])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--child", nargs=2, metavar=("ORTH", "NORM"))
    parser.add_argument("--run-dir")
    args = parser.parse_args()
    if args.child:
        orth, norm = (float(value) for value in args.child)
        print("RESULT " + json.dumps(run_pair(orth, norm, args.lr, args.steps, args.run_dir)))
        return

    import bench_quality
    from harness import markdown_table

    base = bench_quality.child_call(["--evaluate", "lora"])["pretrain_loss"]
    rows = []
    for pair in args.weights:
        orth, norm = pair.split(",")
        with tempfile.TemporaryDirectory() as run_dir:
            command = [sys.executable, __file__, "--child", orth, norm, "--lr", str(args.lr)]
            command += ["--steps", str(args.steps), "--run-dir", run_dir]
            proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{pair} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
        share = result["share"]
        rows.append(
            [
                orth,
                norm,
                f"{result['validation_loss']:.4f}",
                f"{result['test_loss']:.4f}",
                f"{result['pretrain_loss'] - base:+.3f}",
                f"{share['first']:.0%} / {share['middle']:.0%} / {share['last']:.0%}",
            ]
        )
        print(f"{pair}: {rows[-1]}", file=sys.stderr, flush=True)
    print(
        markdown_table(
            ["orth_weight", "norm_weight", "validation loss", "test loss", "forgetting (rise)", "share first/mid/last"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
