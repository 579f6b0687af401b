"""bench_quality.py's fine-tuning comparison with seeds: every method at its best learning rate, trained once per seed
(seed = the adapters' initial values, dropout and the order of the training data), each run scored per test example
and per pretraining-like chunk, so that claims.py can give every figure a 95% interval (seeds x bootstrap over test
examples, ``stats.py``) and a verdict.

    python benchmarks/bench_quality_seeds.py                       # AFINN, 80 steps, the sweep's rates, seeds 0 1 2
    python benchmarks/bench_quality_seeds.py --steps 300 --sweep   # a second budget: rates swept again at seed 0
    python benchmarks/bench_quality_seeds.py --task rotten_tomatoes --sweep
    python benchmarks/bench_quality_seeds.py --task rotten_tomatoes --methods lora effort \
        --rates lora=3e-4 effort=3e-4 --out benchmarks/results/matched_rate   # one rate for both, unswept

Rates: ``--rates-from`` (default: bench_quality.py's ``quality.json``, 80 steps on AFINN) gives each method's rate;
``--sweep`` sweeps again at seed 0 for this task and budget (bench_quality.sweep_rates: a grid of that rate and its
two ladder neighbours, widened while the best validation loss sits at an end) and uses the best; ``--rates``
fixes some methods' rates (not swept), and then needs an ``--out`` other than ``benchmarks/results``, whose files
claims.py reads as best-rate comparisons. Tasks:
``afinn`` (word valence, bench_quality.py's) and ``rotten_tomatoes`` (critics' review snippets, human-written,
positive/negative, the split of bench_svfit_cls.py: 400 test, 200 validation, 2,000 train). Writes
``quality_seeds_<task>_<steps>.json`` (per method: per seed, the scores per test example and per chunk) and ``.md``
to ``--out``; a killed run resumes from ``--runs-root``. ``--add`` keeps the methods already in that results file
and adds (or replaces) the ones this call runs, so a setting can be measured a few methods at a time:

    python benchmarks/bench_quality_seeds.py --task rotten_tomatoes --sweep --methods effort qlora qpissa --add
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")  # claims.py reads the best-rate results files here
sys.path.insert(0, HERE)

import stats  # noqa: E402
from bench_quality import (  # noqa: E402
    LABELS,
    LRS,
    RESULT_FILE,
    TASKS,
    child_call,
    finished_run,
    ladder_neighbour,
    sweep_rates,
    validation_key,
)
from harness import markdown_table, write_report  # noqa: E402

METHODS = ["lora", "pissa", "svfit", "flora", "effort", "qlora", "qpissa"]


def results_name(task: str, steps: int) -> str:
    return f"quality_seeds_{task}_{steps}"


def rates_from(path: str, methods: list[str]) -> dict[str, float]:
    with open(path) as handle:
        report = json.load(handle)
    chosen = report.get("rates") or {method: run["lr"] for method, run in report["best"].items()}
    return {method: chosen[method] for method in methods}


def method_rate(text: str) -> tuple[str, float]:
    """``--rates``' ``METHOD=LR``."""
    method, _, rate = text.partition("=")
    try:
        lr = float(rate)
    except ValueError:
        lr = float("nan")
    if method not in LRS or not 0 < lr < math.inf:
        raise argparse.ArgumentTypeError(
            f"{text!r}: write METHOD=LR with a positive finite rate and METHOD one of {', '.join(LRS)}, "
            "e.g. effort=3e-4"
        )
    return method, lr


def swept_rate(method: str, start: float, steps: int, task: str, runs_root: str) -> tuple[float, list[dict]]:
    grid = [ladder_neighbour(start, up=False), start, ladder_neighbour(start, up=True)]
    runs = sweep_rates(method, steps, runs_root, task, grid)
    return min(runs, key=validation_key)["lr"], [
        {key: run[key] for key in ("lr", "validation_loss", "validation_exact_match")} for run in runs
    ]


def seeded_run(method: str, lr: float, seed: int, steps: int, task: str, runs_root: str) -> dict:
    """Train (or reuse a finished run) and score it per example; seed 0 is the sweep's run at that rate."""
    run_dir = os.path.join(runs_root, f"{method}-{lr:g}" + (f"-seed{seed}" if seed else ""))
    args = ["--steps", str(steps), "--task", task]
    trained = finished_run(run_dir, method, lr, steps, seed, task) or child_call(
        ["--train", method, str(lr), "--run-dir", run_dir, "--seed", str(seed), *args]
    )
    scores_path = os.path.join(run_dir, f"scores_{task}.json")  # a resumed run reuses the scores of a finished one
    if os.path.isfile(scores_path) and os.path.getmtime(scores_path) >= os.path.getmtime(
        os.path.join(run_dir, RESULT_FILE)
    ):
        with open(scores_path) as handle:
            scored = json.load(handle)
    else:
        scored = child_call(["--evaluate", method, run_dir, *args])
        with open(scores_path, "w") as handle:
            json.dump(scored, handle)
    keep = ("lr", "seed", "trainable", "train_seconds", "validation_loss", "validation_exact_match")
    return {**{key: trained[key] for key in keep}, **scored}


def summary_rows(report: dict) -> list[list[str]]:
    """Per method: mean and 95% interval of test loss, exact match and forgetting; test loss minus LoRA's (paired)."""
    base, runs = report["base"], report["runs"]
    rows = []
    for method, seeds in runs.items():
        losses = [run["test_losses"] for run in seeds]
        rises = [[x - b for x, b in zip(run["pretrain_losses"], base["pretrain_losses"])] for run in seeds]
        versus = "-"
        if method != "lora" and "lora" in runs:
            versus = stats.describe(stats.paired_difference(losses, [run["test_losses"] for run in runs["lora"]]))
        rows.append(
            [
                LABELS[method],
                f"{seeds[0]['trainable']:,}",
                f"{report['rates'][method]:g}",
                stats.describe(stats.bootstrap_interval(losses)),
                stats.describe(stats.bootstrap_interval([run["test_correct"] for run in seeds])),
                stats.describe(stats.bootstrap_interval(rises)),
                versus,
            ]
        )
    return rows


def check_same_setting(earlier: dict, setting: dict) -> None:
    for key in ("task", "steps", "seeds"):
        if earlier[key] != setting[key]:
            raise SystemExit(
                f"--add: the results file holds {key} {earlier[key]!r}, this call {setting[key]!r}; "
                "run with the same setting or without --add (which replaces the file)"
            )


def with_earlier_methods(report: dict, earlier: dict) -> dict:
    """``report`` with the methods of ``earlier`` (the same setting's results file) that it did not run; refused when
    the two are not the same setting or their untuned models score differently (then the paired differences to LoRA
    would compare runs of different evaluations)."""
    check_same_setting(earlier, report)
    earlier_base, base = earlier["base"]["test_losses"], report["base"]["test_losses"]
    if len(earlier_base) != len(base):
        raise SystemExit(
            f"--add: the results file scored {len(earlier_base)} test examples, this call {len(base)}: the task's "
            "split changed since those runs, so rerun every method without --add"
        )
    drift = max(abs(a - b) for a, b in zip(earlier_base, base))
    if drift > 1e-4:
        raise SystemExit(
            f"--add: the untuned model's test losses differ from the results file's (by up to {drift:.2g}): the "
            "evaluation changed since those runs, so rerun every method without --add"
        )
    # each method's figures from the report that holds them: this call's, else the results file's
    owner = {
        m: report if m in report["runs"] else earlier for m in METHODS if m in report["runs"] or m in earlier["runs"]
    }
    kept = [method for method, source in owner.items() if source is earlier]
    merged = {
        **report,
        "command": f"{earlier['command'].strip()}; {report['command']}" if kept else report["command"],
        "rates": {m: source["rates"][m] for m, source in owner.items()},
        "sweeps": {m: source["sweeps"][m] for m, source in owner.items() if source["sweeps"].get(m)},
        "runs": {m: source["runs"][m] for m, source in owner.items()},
        "seconds": report["seconds"] + (earlier["seconds"] if kept else 0.0),
    }
    if earlier["rate_source"] != report["rate_source"] and kept:
        merged["rate_source"] = f"{', '.join(kept)}: {earlier['rate_source']}; the others: {report['rate_source']}"
    return merged


def chosen_rates(args: argparse.Namespace, runs_root: str) -> tuple[dict[str, float], dict, str]:
    """Each method's rate (``--rates``, else ``--rates-from``'s, swept again with ``--sweep``), the sweeps' runs,
    and where the rates came from, in words."""
    fixed = dict(args.rates)
    tuned = [method for method in args.methods if method not in fixed]
    rates = {**(rates_from(args.rates_from, tuned) if tuned else {}), **fixed}
    sources = [f"best of bench_quality.py's sweep ({os.path.basename(args.rates_from)})"] if tuned else []
    sweeps = {}
    if args.sweep and tuned:
        for method in tuned:
            rates[method], sweeps[method] = swept_rate(method, rates[method], args.steps, args.task, runs_root)
        sources = ["swept again at seed 0 for this task and budget (validation loss)"]
    if fixed:
        sources.append(f"{', '.join(f'{m} {lr:g}' for m, lr in fixed.items())} set by --rates")
    return {method: rates[method] for method in args.methods}, sweeps, "; ".join(sources)


def report_markdown(report: dict) -> str:
    table = markdown_table(
        [
            "method",
            "trainable",
            "lr",
            "test loss",
            "test exact match",
            "forgetting (rise of pretraining-like loss)",
            "test loss minus LoRA's (paired)",
        ],
        summary_rows(report),
    )
    base = report["base"]
    return (
        f"`{report['command']}` ({report['seconds'] / 60:.0f} min)\n\n"
        f"SmolLM2-135M-Instruct, task {report['task']}, {report['steps']} steps of batch 8, all linear layers, r=16, "
        f"seeds {', '.join(map(str, report['seeds']))} (initial values, dropout, data order); rates: "
        f"{report['rate_source']}. Base model: test loss {base['test_loss']:.4f}, exact match "
        f"{base['exact_match']:.3f}. Each figure: mean over seeds and test examples (forgetting: over 32 chunks), "
        f"95% interval over seeds x bootstrap of examples.\n\n{table}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="afinn")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=list(LRS), default=METHODS)
    parser.add_argument("--rates-from", default=os.path.join(RESULTS, "quality.json"))
    parser.add_argument("--sweep", action="store_true", help="sweep the rates again at seed 0 (around --rates-from)")
    parser.add_argument(
        "--rates",
        nargs="+",
        type=method_rate,
        default=[],
        metavar="METHOD=LR",
        help="train these methods at these rates, unswept (e.g. a matched-rate comparison: lora=3e-4 effort=3e-4)",
    )
    parser.add_argument("--runs-root", default=None, help="default: runs/quality_seeds/<task>_<steps>")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument(
        "--add", action="store_true", help="keep the other methods' runs from the results file in --out (if any)"
    )
    args = parser.parse_args()
    if stray := sorted({method for method, _ in args.rates} - set(args.methods)):
        parser.error(f"--rates sets {', '.join(stray)}, which --methods does not run: add it to --methods")
    if args.rates and os.path.abspath(args.out) == RESULTS:
        parser.error("--rates: give --out another folder; claims.py reads benchmarks/results as best-rate comparisons")
    name = results_name(args.task, args.steps)
    runs_root = args.runs_root or os.path.join(os.path.dirname(HERE), "runs", "quality_seeds", name)
    os.makedirs(runs_root, exist_ok=True)
    started = time.perf_counter()
    earlier = None
    if args.add and os.path.isfile(earlier_path := os.path.join(args.out, f"{name}.json")):
        with open(earlier_path) as handle:
            earlier = json.load(handle)
        check_same_setting(earlier, {"task": args.task, "steps": args.steps, "seeds": args.seeds})

    rates, sweeps, source = chosen_rates(args, runs_root)
    runs = {}
    for method in args.methods:
        runs[method] = []
        for seed in args.seeds:
            runs[method].append(seeded_run(method, rates[method], seed, args.steps, args.task, runs_root))
            run = runs[method][-1]
            print(f"{method} seed {seed}: test loss {run['test_loss']:.4f}", file=sys.stderr, flush=True)
    report = {
        "command": "python benchmarks/bench_quality_seeds.py " + " ".join(sys.argv[1:]),
        "task": args.task,
        "steps": args.steps,
        "seeds": args.seeds,
        "rates": rates,
        "rate_source": source,
        "sweeps": sweeps,
        "base": child_call(["--evaluate", "lora", "--task", args.task]),
        "runs": runs,
        "seconds": time.perf_counter() - started,
    }
    if earlier is not None:
        report = with_earlier_methods(report, earlier)
    report["mean_train_seconds"] = statistics.mean(r["train_seconds"] for rs in report["runs"].values() for r in rs)
    markdown = report_markdown(report)
    write_report(args.out, name, report, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
