"""What the step benchmarks share: each (method, repetition) in a fresh process, methods interleaved so machine
noise spreads evenly over them, medians over processes, and a Markdown table against a reference method."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from typing import Callable


def reset_peak_rss() -> None:
    """Start VmHWM afresh (Linux): peak RSS is then measured from here on."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def peak_rss_kib() -> int:
    """VmHWM, the process's peak RSS in KiB since it started or since :func:`reset_peak_rss` (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("VmHWM not found: this benchmark needs Linux")


def timed_steps(step: Callable[[], None], steps: int, warmup: int = 2) -> float:
    """Median seconds of ``steps`` calls of ``step`` after ``warmup`` untimed ones."""
    times = []
    for index in range(warmup + steps):
        start = time.perf_counter()
        step()
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_interleaved(script: str, methods: list[str], reps: int, child_args: list[str]) -> dict[str, dict]:
    """Median over ``reps`` fresh processes of each method's result dict (``script --child METHOD ...`` prints
    ``RESULT {json}``)."""
    runs = {method: [] for method in methods}
    for rep in range(reps):
        for method in methods:
            proc = subprocess.run(
                [sys.executable, script, "--child", method, *child_args], capture_output=True, text=True, check=False
            )
            if proc.returncode:
                raise RuntimeError(f"{method} failed:\n{proc.stderr[-3000:]}")
            line = next(out for out in proc.stdout.splitlines() if out.startswith("RESULT "))
            runs[method].append(json.loads(line[len("RESULT ") :]))
            print(f"{method} rep {rep}: {runs[method][-1]}", file=sys.stderr, flush=True)
    return {
        method: {key: statistics.median(r[key] for r in results) for key in results[0]}
        for method, results in runs.items()
    }


def write_report(out: str, name: str, report: dict, markdown: str) -> None:
    """``<out>/<name>.json`` (the numbers, read by claims.py) and ``<out>/<name>.md`` (their tables)."""
    import os

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    with open(os.path.join(out, f"{name}.md"), "w") as handle:
        handle.write(markdown)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def print_table(rows: dict[str, dict], reference: str) -> None:
    ref = rows.get(reference, next(iter(rows.values())))
    headers = ["method", "trainable params", "step s", "step / LoRA", "peak RSS MiB", "peak / LoRA"]
    extra = "init_s" in ref  # newer children also time the init and measure the saved adapter
    if extra:
        headers += ["init s", "adapter MiB"]
    table = []
    for method, row in rows.items():
        cells = [
            method,
            f"{row['trainable']:,.0f}",
            f"{row['step_s']:.3f}",
            f"{row['step_s'] / ref['step_s']:.3f}x",
            f"{row['peak_mib']:.0f}",
            f"{row['peak_mib'] / ref['peak_mib']:.3f}x",
        ]
        if extra:
            cells += [f"{row['init_s']:.2f}", f"{row['adapter_mib']:.2f}"]
        table.append(cells)
    print(markdown_table(headers, table))
