"""Wall time of the default test suite (what `make test` runs), the number the README quotes, and where it goes.

    python benchmarks/bench_suite.py [--runs 1] [--top 15] [--out benchmarks/results/suite.json]

Each run is `python -m pytest -q -p no:cacheprovider --durations=0` in a fresh process from the repository root, with
nothing else running (measure on an idle machine: two torch jobs on two cores slow each other down ~2-10x). Prints
the median wall time, the test count, and the files and tests that take the longest; writes the same as JSON. The
default suite's goal is <= 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DURATION = re.compile(r"^\s*([\d.]+)s (setup|call|teardown)\s+(\S+)")
SUMMARY = re.compile(r"(\d+) passed")


def one_run() -> dict:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"the suite failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    per_test: dict[str, float] = collections.defaultdict(float)
    for line in proc.stdout.splitlines():
        match = DURATION.match(line)
        if match:
            per_test[match.group(3)] += float(match.group(1))
    passed = SUMMARY.search(proc.stdout.splitlines()[-1])
    return {"wall_s": wall, "passed": int(passed.group(1)) if passed else None, "per_test": dict(per_test)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "suite.json"))
    args = parser.parse_args()
    runs = [one_run() for _ in range(args.runs)]
    walls = [run["wall_s"] for run in runs]
    last = runs[-1]["per_test"]
    per_file: dict[str, float] = collections.defaultdict(float)
    for test, seconds in last.items():
        per_file[test.split("::")[0]] += seconds
    result = {
        "cores": os.cpu_count(),
        "runs": args.runs,
        "wall_s": walls,
        "median_wall_s": statistics.median(walls),
        "passed": runs[-1]["passed"],
        "slowest_files": dict(sorted(per_file.items(), key=lambda kv: -kv[1])[: args.top]),
        "slowest_tests": dict(sorted(last.items(), key=lambda kv: -kv[1])[: args.top]),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
    print(
        f"default suite: median {result['median_wall_s'] / 60:.2f} min over {args.runs} run(s), {result['passed']} "
        f"passed, {os.cpu_count()} cores"
    )
    print("| file | s |\n|---|---|")
    for name, seconds in result["slowest_files"].items():
        print(f"| `{name}` | {seconds:.1f} |")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
