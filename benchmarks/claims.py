"""The claims table: per method, what its paper claims, what the benchmarks here measured, and the command that
measured it, read from the JSON files the benchmarks write into ``--results`` (run_all.py calls this at its end).

    python benchmarks/claims.py [--results benchmarks/results]     # prints the table from the files already there

A claim whose benchmark has not run yet (its JSON file is absent, or was written by an older version of the benchmark)
gets "not measured" in its row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import stats  # noqa: E402

QUALITY = "python benchmarks/bench_quality.py"
MERGE = "python benchmarks/bench_merge.py"
QPISSA_ITERS = "python benchmarks/bench_qpissa_iters.py --model smollm2"
CONCRETE_TA = "python benchmarks/bench_concrete_ta.py --seeds 0 1 2"


def _load(results: str, name: str) -> Optional[dict]:
    path = os.path.join(results, name)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def _verdict(holds: bool) -> str:
    """A verdict from one run, with no interval (the older benchmarks'): said as such."""
    return ("holds" if holds else "does not hold") + " (1 run, no interval)"


def _pissa(quality: dict) -> tuple[str, bool]:
    lora, pissa = quality["best"]["lora"], quality["best"]["pissa"]
    text = f"test loss {pissa['test_loss']:.3f} vs LoRA {lora['test_loss']:.3f} (same rank, each at its best rate)"
    return text, pissa["test_loss"] < lora["test_loss"]


def _svfit(quality: dict) -> tuple[str, bool]:
    lora, svfit = quality["best"]["lora"], quality["best"]["svfit"]
    ratio = svfit["test_loss"] / lora["test_loss"]
    share = svfit["trainable"] / lora["trainable"]
    text = (
        f"test loss {svfit['test_loss']:.3f} vs LoRA {lora['test_loss']:.3f} ({ratio:.2f}x) with "
        f"{svfit['trainable']:,} trained numbers (1/{1 / share:.0f} of LoRA's)"
    )
    return text, ratio <= 1.05 and share <= 1 / 16


def _flora(quality: dict) -> tuple[str, bool]:
    lora, flora = quality["best"]["lora"], quality["best"]["flora"]
    text = f"Linear layers: test loss {flora['test_loss']:.3f} vs LoRA {lora['test_loss']:.3f} at matched parameters"
    return text, flora["test_loss"] <= lora["test_loss"] * 1.05


def _effort(quality: dict) -> tuple[str, bool]:
    base, best = quality["base"]["pretrain_loss"], quality["best"]
    size = best["effort"]["trainable"]
    # the adapters of LoRA's size (within 2x of Effort's trained numbers): SVFit's few thousand are another regime
    rises = {
        m: r["pretrain_loss"] - base for m, r in best.items() if m != "full" and size / 2 <= r["trainable"] <= 2 * size
    }
    share = quality.get("regulariser_share", {}).get("effort")
    least = min(rises, key=rises.get)
    text = f"forgetting +{rises['effort']:.3f} (LoRA +{rises['lora']:.3f}; least of the LoRA-sized adapters: {least})"
    if share:
        text += f"; regulariser {share['first']:.0%} -> {share['last']:.0%} of the loss"
    return text, least == "effort"


def _qpissa(quality: dict) -> tuple[str, bool]:
    errors, best = quality["quantisation_errors"], quality["best"]
    text = (
        f"quantisation error {errors['ratio']:.2f}x QLoRA's (1 iteration), {errors['ratio_iters']:.2f}x "
        f"(5 iterations); test loss {best['qpissa']['test_loss']:.3f} vs QLoRA {best['qlora']['test_loss']:.3f}"
    )
    return text, errors["ratio_iters"] <= 0.85 and best["qpissa"]["test_loss"] <= best["qlora"]["test_loss"]


def _merge_row(method: str, rivals: tuple[str, ...]) -> Callable[[dict], tuple[str, bool]]:
    def measure(merge: dict) -> tuple[str, bool]:
        averages = {name: row["average"] for name, row in merge["methods"].items()}
        text = f"average accuracy {averages[method]:.3f}; " + ", ".join(f"{r} {averages[r]:.3f}" for r in rivals)
        return text, all(averages[method] > averages[r] for r in rivals)

    return measure


def task_weighted(correct_by_task: dict) -> list[float]:
    """Per-example scores, concatenated over tasks and scaled so that their plain mean is the mean over tasks of
    each task's accuracy (the tables' "average")."""
    tasks, total = len(correct_by_task), sum(len(c) for c in correct_by_task.values())
    return [x * total / (tasks * len(c)) for c in correct_by_task.values() for x in c]


def _concrete_ta(report: dict) -> tuple[str, str]:
    """Concrete TA at the reference's settings against task arithmetic at the lambda chosen on the same validation
    split, paired by test example, over the seeds that ran."""
    runs = [run for run in report["runs"] if run["setting"] == "reference"]
    chosen = next(row for label, row in report["baselines"].items() if "chosen" in label)
    ours = [task_weighted(run["final"][run["returned_final_mask"]]["correct"]) for run in runs]
    baseline = [task_weighted(chosen["correct"])] * len(runs)  # deterministic: the same for every seed
    merged, difference = stats.bootstrap_interval(ours), stats.paired_difference(ours, baseline)
    text = (
        f"reference settings (lambda {runs[0]['scaling']} chosen on validation, mask lr 1e-4, batches of 16 "
        f"reshuffled, Concrete sample returned, early stopping): average accuracy {stats.describe(merged)}; task "
        f"arithmetic at the same lambda {chosen['average']:.3f}; difference {stats.describe(difference)}"
    )
    return text, stats.verdict(difference)


def _svfit_classification(report: dict) -> tuple[str, str]:
    """SVFit's default (energy 0.99) and top-16 against LoRA r=8 on sentence classification (3 seeds each): the
    accuracy ratio's interval against 0.95, at >= 16x fewer trained parameters (heads excluded)."""
    verdicts, summary = report["verdicts"], report["summary"]
    parts = [
        f"{label} {summary[key]['mean']:.3f}, ratio to LoRA {v['ratio']:.3f} [{v['ratio_interval_95'][0]:.3f}, "
        f"{v['ratio_interval_95'][1]:.3f}] at 1/{v['factor_without_head']:.0f} of its parameters ({v['without_head']})"
        for key, label in (("svfit_energy", "energy 0.99"), ("svfit_r16", "top 16"))
        for v in [verdicts[key]]
    ]
    text = (
        f"MiniLM sentence classification (Rotten Tomatoes snippets, {report['settings']['seeds']} seeds): LoRA "
        f"{summary['lora']['mean']:.3f}; " + "; ".join(parts)
    )
    return text, verdicts["svfit_energy"]["without_head"]  # the default


def _flora_conv(report: dict) -> tuple[str, str]:
    """FLoRA against LoRA on the conv layers of a pretrained CNN, per matched budget (10 seeds each): "holds" when
    every budget holds, "does not hold" when one does not, else "cannot tell" (bench_flora_conv.py's rule)."""
    primary = {name: c for name, c in report["comparisons"].items() if c.get("primary")}
    parts = [
        f"{report['methods'][name]['budget']}: {100 * c['difference']:+.2f} points [{100 * c['interval_95'][0]:+.2f}, "
        f"{100 * c['interval_95'][1]:+.2f}] ({c['verdict']})"
        for name, c in primary.items()
    ]
    verdicts = {c["verdict"] for c in primary.values()}
    overall = "holds" if verdicts == {"holds"} else "does not hold" if "does not hold" in verdicts else "cannot tell"
    text = (
        f"convolutions (digits 5-9 rotated, CNN pretrained on 0-4, {report['settings']['seeds']} seeds): FLoRA - LoRA "
        "test accuracy at matched parameters, " + "; ".join(parts)
    )
    return text, overall


# (method, paper's claim, results file, how to read it, command)
CLAIMS = (
    ("PiSSA", "lower loss than LoRA at the same rank and steps", "quality.json", _pissa, QUALITY),
    (
        "QPiSSA",
        "lower quantisation error than QLoRA (target <= 0.85x) and lower loss after the same steps",
        "quality.json",
        _qpissa,
        QUALITY,
    ),
    ("SVFit", "LoRA's quality (within 5%) with >= 16x fewer trained parameters", "quality.json", _svfit, QUALITY),
    (
        "SVFit, classification",
        "LoRA's quality (within 5%) with >= 16x fewer trained parameters, on sentence classification",
        "svfit_cls.json",
        _svfit_classification,
        "python benchmarks/bench_svfit_cls.py",
    ),
    ("FLoRA", "LoRA's quality at matched parameters (its gains are on convolutions)", "quality.json", _flora, QUALITY),
    (
        "FLoRA, convolutions",
        "LoRA's quality at matched parameters on convolutions (within 1 point)",
        "flora_conv.json",
        _flora_conv,
        "python benchmarks/bench_flora_conv.py",
    ),
    ("Effort", "forgets least of the LoRA-sized adapters while fitting the task", "quality.json", _effort, QUALITY),
    ("Concrete Task Arithmetic", "above task arithmetic", "concrete_ta.json", _concrete_ta, CONCRETE_TA),
    (
        "Concrete AdaMerging",
        "above AdaMerging and TIES",
        "merge.json",
        _merge_row("concrete_adamerging", ("adamerging", "ties")),
        MERGE,
    ),
)


def claims_table(results: str) -> str:
    rows = ["| method | paper's claim | measured here | verdict | command |", "|---|---|---|---|---|"]
    for method, claim, file, measure, command in CLAIMS:
        data = _load(results, file)
        if data is None:
            measured, verdict = f"not measured ({file} absent)", "-"
        else:
            try:
                measured, holds = measure(data)
                verdict = holds if isinstance(holds, str) else _verdict(holds)
            except KeyError as missing:  # a results file written by an older version of its benchmark
                measured, verdict = f"not measured ({file} lacks {missing}: rerun the command)", "-"
        rows.append(f"| {method} | {claim} | {measured} | {verdict} | `{command}` |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    print(claims_table(parser.parse_args().results))


if __name__ == "__main__":
    main()
