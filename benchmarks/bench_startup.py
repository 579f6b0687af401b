"""What the start-up hook costs every Python process: ``python -c pass`` with and without it, and what it imports.

    python benchmarks/bench_startup.py [--runs 30]

The hook is ``subspace_peft-autoregister.pth`` in this environment's site-packages (installed with the package, see
setup.py). Three variants, interleaved, each a fresh ``python -c pass`` timed from outside (wall clock, median of
``--runs``): ``with`` (as installed), ``off`` (``SUBSPACE_PEFT_AUTOREGISTER=0``: the line runs, the hook returns), and
``without`` (the .pth file renamed aside for the run, and renamed back in a ``finally``; an aside copy left by a killed
run is put back first). Also the hook's own import time from ``-X importtime`` (median) and the modules it adds at
start-up (the goal: the hook alone, no torch, no peft). Goal: ``with`` <= ``without`` + 3 ms. Each variant runs
twice: with the environment as it is, and with bytecode caching on (``PYTHONDONTWRITEBYTECODE`` removed, the cache
warmed once), since a machine that sets that variable compiles the hook at every start (this one does; pip compiles
a wheel's modules at install, an editable install's on first import). Writes benchmarks/results/startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import sysconfig
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PTH = os.path.join(sysconfig.get_paths()["purelib"], "subspace_peft-autoregister.pth")
ASIDE = PTH + ".aside"


def run_pass(env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
    return time.perf_counter() - start


def hook_import_us(env: dict) -> float:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True, env=env)
    match = re.search(r"import time:\s+\d+ \|\s+(\d+) \|\s+_subspace_peft_autoregister", proc.stderr)
    return float(match.group(1)) if match else float("nan")


def added_modules() -> list[str]:
    code = "import sys; print(' '.join(sorted(sys.modules)))"
    with_hook = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split()
    os.rename(PTH, ASIDE)
    try:
        without = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split()
    finally:
        os.rename(ASIDE, PTH)
    return sorted(set(with_hook) - set(without))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    if os.path.exists(ASIDE) and not os.path.exists(PTH):
        os.rename(ASIDE, PTH)  # a killed run left it aside
    if not os.path.exists(PTH):
        sys.exit(f"no {PTH}: install the package (pip install -e .) first")
    result = {"runs": args.runs, "modules_added_at_start_up": added_modules()}
    cached = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    run_pass(cached)  # writes the hook's bytecode, if it may
    environments = {"as is": dict(os.environ), "bytecode cached": cached}
    print(f"python -c pass, median of {args.runs} fresh processes (ms):")
    print("| environment | with the hook | SUBSPACE_PEFT_AUTOREGISTER=0 | without the .pth | hook cost | its import |")
    print("|---|---|---|---|---|---|")
    for label, env in environments.items():
        times = {"with": [], "off": [], "without": []}
        for _ in range(args.runs):
            times["with"].append(run_pass(env))
            times["off"].append(run_pass({**env, "SUBSPACE_PEFT_AUTOREGISTER": "0"}))
            os.rename(PTH, ASIDE)
            try:
                times["without"].append(run_pass(env))
            finally:
                os.rename(ASIDE, PTH)
        medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
        import_us = statistics.median(hook_import_us(env) for _ in range(args.runs))
        result[label] = {
            "median_ms": medians,
            "hook_cost_ms": medians["with"] - medians["without"],
            "import_us": import_us,
        }
        print(
            f"| {label} | {medians['with']:.1f} | {medians['off']:.1f} | {medians['without']:.1f} | "
            f"{medians['with'] - medians['without']:+.1f} | {import_us / 1e3:.1f} |"
        )
    with open(os.path.join(HERE, "results", "startup.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"modules added at start-up: {result['modules_added_at_start_up']}")


if __name__ == "__main__":
    main()
