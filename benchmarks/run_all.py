"""Run every benchmark of the report in one go and write its tables and plots (CPU, about eight hours).

    pip install -e ".[bench]"; python benchmarks/run_all.py [--out benchmarks/results] [--quick]

Parts, in order, each a script of this folder run as its own process (so its timings and memory are its own):
1. speed and memory against PEFT LoRA on SmolLM2-135M (bench_step.py: init time, step time, peak RSS, trainable
   parameters, adapter size);
2. the same on MiniLM-L6;
3. singular-value spectra (bench_spectrum.py, subspace_peft.spectrum; PNGs);
4. quality: every method fine-tuned at its best learning rate, QPiSSA against QLoRA, forgetting (bench_quality.py;
   loss-curve PNG), then each method at that rate with three seeds, per-example scores for the claims' intervals
   (bench_quality_seeds.py);
5. reload time of a saved adapter against LoRA's (bench_reload.py);
6. merging three MiniLM fine-tunes: task arithmetic, TIES, DARE, AdaMerging, Concrete TA and Concrete AdaMerging at
   FusionBench's budget (bench_merge.py; entropy-curve PNG).
Writes REPORT.md (every table under the command that reproduces it, then the claims table of claims.py: per method,
the paper's claim, what was measured and the command) into ``--out``. ``--quick`` shrinks every part
(one process per method, 20 training steps) to check the pipeline in a few minutes; its numbers mean nothing.
Run it on a quiet machine: other work on the cores changes the timings.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ["lora", "pissa", "svfit", "flora", "effort"]


def parts(out: str, quick: bool) -> list[tuple[str, list[str]]]:
    reps = ["--reps", "1", "--steps", "3"] if quick else ["--reps", "2"]
    steps = ["--steps", "20"] if quick else []
    return [
        ("Speed and memory on SmolLM2-135M", ["bench_step.py", "--model", "smollm2", "--methods", *METHODS, *reps]),
        (
            "Speed and memory on MiniLM-L6",
            ["bench_step.py", "--model", "minilm", "--methods", *METHODS, *(reps if quick else ["--reps", "3"])],
        ),
        ("Spectra", ["bench_spectrum.py", "--out", out]),
        ("Quality, QPiSSA against QLoRA, forgetting", ["bench_quality.py", "--out", out, *steps]),
        (
            "Quality with seeds",
            ["bench_quality_seeds.py", "--out", out, "--rates-from", os.path.join(out, "quality.json")]
            + (["--steps", "20", "--seeds", "0", "1", "--methods", "lora", "pissa"] if quick else []),
        ),
        ("Reload time", ["bench_reload.py", "--reps", "1" if quick else "5"]),
        ("Merging", ["bench_merge.py", "--out", out, *(["--quick"] if quick else [])]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    sections, started = [], time.perf_counter()
    for title, command in parts(args.out, args.quick):
        print(f"== {title}: python benchmarks/{' '.join(command)}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, os.path.join(HERE, command[0]), *command[1:]], capture_output=True, text=True
        )
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{command[0]} failed:\n{proc.stderr[-4000:]}")
        shown = " ".join(a if not a.startswith(args.out) else "benchmarks/results" for a in command)
        sections.append(
            f"## {title}\n\n`python benchmarks/{shown}` ({seconds / 60:.1f} min)\n\n{proc.stdout.strip()}\n"
        )
        print(proc.stdout, flush=True)
    from claims import claims_table

    sections.append(f"## Claims\n\n`python benchmarks/claims.py`\n\n{claims_table(args.out)}\n")
    report = (
        f"# Benchmark report\n\nWritten by `python benchmarks/run_all.py{' --quick' if args.quick else ''}` in "
        f"{(time.perf_counter() - started) / 60:.1f} min.\n\n" + "\n".join(sections)
    )
    with open(os.path.join(args.out, "REPORT.md"), "w") as handle:
        handle.write(report)
    print(f"wrote {os.path.join(args.out, 'REPORT.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
