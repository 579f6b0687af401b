"""The claims table: per method, what its paper claims, what the benchmarks here measured, and the command that
measured it, read from the JSON files the benchmarks write into ``--results`` (run_all.py calls this at its end).

    python benchmarks/claims.py [--results benchmarks/results]     # prints the table from the files already there

A claim whose benchmark has not run yet (its JSON file is absent, or was written by an older version of the benchmark)
gets "not measured" in its row.
"""

from __future__ import annotations

import argparse
import glob
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
QUALITY_SEEDS = "python benchmarks/bench_quality_seeds.py"
SEEDED = "quality_seeds_*.json"  # one file per task and budget (bench_quality_seeds.py)


def _load(results: str, name: str) -> Optional[dict | list[dict]]:
    """The JSON file ``name`` in ``results``; a pattern (``*``) gives the list of its files (None: none there)."""
    paths = sorted(glob.glob(os.path.join(results, name))) if "*" in name else [os.path.join(results, name)]
    paths = [path for path in paths if os.path.isfile(path)]
    if not paths:
        return None
    loaded = []
    for path in paths:
        with open(path) as handle:
            loaded.append(json.load(handle))
    return loaded if "*" in name else loaded[0]


def _verdict(holds: bool) -> str:
    """A verdict from one run, with no interval (the older benchmarks'): said as such."""
    return ("holds" if holds else "does not hold") + " (1 run, no interval)"


def _settings(reports: list[dict], *methods: str) -> list[tuple[str, dict]]:
    """The seeded settings (task, budget) whose report holds every one of ``methods``: a run of some methods only
    (``--methods``) counts for the claims about those. None does: KeyError, the row says "not measured"."""
    held = [r for r in reports if all(method in r["runs"] for method in methods)]
    if not held:
        raise KeyError(", ".join(methods))
    return [(_setting_name(r), r) for r in sorted(held, key=_setting_order)]


def _setting_name(report: dict) -> str:
    return f"{report['task']}, {report['steps']} steps"


def _setting_order(report: dict) -> tuple[str, int]:
    return report["task"], report["steps"]


def _seeded_command(command: str, data: list, measured: str) -> str:
    """A seeded row's command names the command of every setting (task, budget) its figures came from."""
    reports = next((loaded for loaded in data if isinstance(loaded, list)), None)
    if reports is None or QUALITY_SEEDS not in command:
        return command
    used = sorted((r for r in reports if _setting_name(r) in measured), key=_setting_order)
    return command.replace(QUALITY_SEEDS, "; ".join(r["command"].strip() for r in used) or QUALITY_SEEDS)


def _losses(report: dict, method: str) -> list[list[float]]:
    return [run["test_losses"] for run in report["runs"][method]]


def _summary(parts: list[str], verdicts: list[str], settings: list[tuple[str, dict]]) -> tuple[str, str]:
    seeds = min(len(report["seeds"]) for _, report in settings)
    return f"{seeds} seeds each; " + "; ".join(parts), stats.combined(verdicts)


def _lower_loss(method: str, rival: str, label: str, rival_label: str) -> Callable[[list[dict]], tuple[str, str]]:
    """``method``'s test loss below ``rival``'s, paired by seed and test example, in every seeded setting."""

    def measure(reports: list[dict]) -> tuple[str, str]:
        parts, verdicts, settings = [], [], _settings(reports, method, rival)
        for name, report in settings:
            difference = stats.paired_difference(_losses(report, rival), _losses(report, method))
            verdicts.append(stats.verdict(difference))
            parts.append(
                f"{name}: test loss {label} {stats.mean(_losses(report, method)):.3f} vs "
                f"{rival_label} {stats.mean(_losses(report, rival)):.3f}, {rival_label} minus "
                f"{label} {difference['mean']:+.3f} [{difference['low']:+.3f}, {difference['high']:+.3f}] "
                f"({verdicts[-1]})"
            )
        return _summary(parts, verdicts, settings)

    return measure


def _within_lora(method: str, label: str, share_at_most: float) -> Callable[[list[dict]], tuple[str, str]]:
    """``method``'s test loss within 5% of LoRA's (the ratio's interval below 1.05) with at most ``share_at_most``
    of LoRA's trained numbers, in every seeded setting."""

    def measure(reports: list[dict]) -> tuple[str, str]:
        parts, verdicts, settings = [], [], _settings(reports, method, "lora")
        for name, report in settings:
            ratio = stats.ratio_interval(_losses(report, method), _losses(report, "lora"))
            share = report["runs"][method][0]["trainable"] / report["runs"]["lora"][0]["trainable"]
            verdicts.append(stats.verdict(ratio, 1.05, above=False) if share <= share_at_most else "does not hold")
            size = f"1/{1 / share:.0f} of its" if share < 0.5 else f"{share:.2f}x its"
            parts.append(
                f"{name}: {label} test loss {ratio['mean']:.2f}x LoRA's [{ratio['low']:.2f}, {ratio['high']:.2f}] "
                f"with {size} trained numbers ({verdicts[-1]})"
            )
        return _summary(parts, verdicts, settings)

    return measure


def _effort(reports: list[dict]) -> tuple[str, str]:
    """Effort's rise of the pretraining-like loss below each full-precision LoRA-sized adapter's (trained numbers
    within 2x of Effort's; QLoRA and QPiSSA are left out, their nf4 base alone raises that loss), paired by seed
    and chunk, in every seeded setting."""
    parts, verdicts, settings = [], [], _settings(reports, "effort", "lora")
    for name, report in settings:
        runs, size = report["runs"], report["runs"]["effort"][0]["trainable"]
        pretrain = {m: [run["pretrain_losses"] for run in seeds] for m, seeds in runs.items()}
        sized = [m for m in ("lora", "pissa", "flora") if m in runs]
        rivals = [m for m in sized if size / 2 <= runs[m][0]["trainable"] <= 2 * size]
        base = report["base"]["pretrain_loss"]
        setting = []
        for rival in rivals:
            difference = stats.paired_difference(pretrain[rival], pretrain["effort"])
            verdicts.append(stats.verdict(difference))
            setting.append(
                f"{rival} +{stats.mean(pretrain[rival]) - base:.3f}, less by "
                f"{difference['mean']:+.3f} [{difference['low']:+.3f}, {difference['high']:+.3f}] ({verdicts[-1]})"
            )
        effort_rise = stats.mean(pretrain["effort"]) - base
        loss_ratio = stats.mean(_losses(report, "effort")) / stats.mean(_losses(report, "lora"))
        parts.append(f"{name}: forgetting Effort +{effort_rise:.3f} (test loss {loss_ratio:.2f}x LoRA's) vs ")
        parts[-1] += ", ".join(setting)
    return _summary(parts, verdicts, settings)


def _qpissa(quality: dict, reports: list[dict]) -> tuple[str, str]:
    """The quantisation error at init (deterministic, from bench_quality.py) at most 0.85x QLoRA's, and the test
    loss below QLoRA's in every seeded setting."""
    errors = quality["quantisation_errors"]
    text, verdict = _lower_loss("qpissa", "qlora", "QPiSSA", "QLoRA")(reports)
    text = (
        f"quantisation error {errors['ratio']:.2f}x QLoRA's (1 iteration), {errors['ratio_iters']:.2f}x "
        f"(5 iterations; one deterministic measurement); {text}"
    )
    return text, verdict if errors["ratio_iters"] <= 0.85 else "does not hold"


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


def _concrete_adamerging(report: dict) -> tuple[str, str]:
    """Concrete AdaMerging against AdaMerging (same seeds) and TIES (deterministic), paired by seed and test example
    (each task weighted equally): "holds" when it is above both."""
    by_method: dict[str, list] = {}
    for run in sorted(report["runs"], key=lambda run: run["seed"] or 0):  # paired by seed
        by_method.setdefault(run["method"], []).append(run)
    if [run["seed"] for run in by_method["concrete_adamerging"]] != [run["seed"] for run in by_method["adamerging"]]:
        raise ValueError("concrete_adamerging.json: Concrete AdaMerging and AdaMerging ran with different seeds")
    ours = [task_weighted(run["correct"]) for run in by_method["concrete_adamerging"]]
    rivals = {
        "AdaMerging": [task_weighted(run["correct"]) for run in by_method["adamerging"]],
        "TIES": [task_weighted(by_method["ties"][0]["correct"])] * len(ours),
    }
    parts, verdicts = [f"average accuracy {stats.describe(stats.bootstrap_interval(ours))}"], []
    for name, scores in rivals.items():
        difference = stats.paired_difference(ours, scores)
        verdicts.append(stats.verdict(difference))
        parts.append(
            f"{name} {stats.mean(scores):.3f}, difference {difference['mean']:+.3f} "
            f"[{difference['low']:+.3f}, {difference['high']:+.3f}] ({verdicts[-1]})"
        )
    return "FusionBench's settings, mask lr 1e-4: " + "; ".join(parts), stats.combined(verdicts)


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
    (
        "PiSSA",
        "lower loss than LoRA at the same rank and steps",
        SEEDED,
        _lower_loss("pissa", "lora", "PiSSA", "LoRA"),
        QUALITY_SEEDS,
    ),
    (
        "QPiSSA",
        "lower quantisation error than QLoRA (target <= 0.85x) and lower loss after the same steps",
        ("quality.json", SEEDED),
        _qpissa,
        f"{QUALITY}; {QUALITY_SEEDS}",
    ),
    (
        "SVFit",
        "LoRA's quality (within 5%) with >= 16x fewer trained parameters",
        SEEDED,
        _within_lora("svfit", "SVFit", 1 / 16),
        QUALITY_SEEDS,
    ),
    (
        "SVFit, classification",
        "LoRA's quality (within 5%) with >= 16x fewer trained parameters, on sentence classification",
        "svfit_cls.json",
        _svfit_classification,
        "python benchmarks/bench_svfit_cls.py",
    ),
    (
        "FLoRA",
        "LoRA's quality at matched parameters (its gains are on convolutions)",
        SEEDED,
        _within_lora("flora", "FLoRA", 1.25),
        QUALITY_SEEDS,
    ),
    (
        "FLoRA, convolutions",
        "LoRA's quality at matched parameters on convolutions (within 1 point)",
        "flora_conv.json",
        _flora_conv,
        "python benchmarks/bench_flora_conv.py",
    ),
    (
        "Effort",
        "forgets least of the LoRA-sized adapters while fitting the task",
        SEEDED,
        _effort,
        QUALITY_SEEDS,
    ),
    ("Concrete Task Arithmetic", "above task arithmetic", "concrete_ta.json", _concrete_ta, CONCRETE_TA),
    (
        "Concrete AdaMerging",
        "above AdaMerging and TIES",
        "concrete_adamerging.json",
        _concrete_adamerging,
        "python benchmarks/bench_concrete_adamerging.py",
    ),
)
# a claim whose seeded benchmark has not run yet falls back to its earlier one-run measurement
FALLBACKS = {
    "Concrete AdaMerging": ("merge.json", _merge_row("concrete_adamerging", ("adamerging", "ties")), MERGE),
}


def claims_table(results: str) -> str:
    rows = ["| method | paper's claim | measured here | verdict | command |", "|---|---|---|---|---|"]
    for method, claim, files, measure, command in CLAIMS:
        names = files if isinstance(files, tuple) else (files,)
        if _load(results, names[0]) is None and method in FALLBACKS:
            fallback, measure, command = FALLBACKS[method]
            names = (fallback,)
        data = [_load(results, name) for name in names]
        if any(loaded is None for loaded in data):
            absent = ", ".join(name for name, loaded in zip(names, data) if loaded is None)
            measured, verdict = f"not measured ({absent} absent)", "-"
        else:
            try:
                measured, holds = measure(*data)
                verdict = holds if isinstance(holds, str) else _verdict(holds)
                command = _seeded_command(command, data, measured)
            except KeyError as missing:  # a results file written by an older version of its benchmark
                measured, verdict = f"not measured ({', '.join(names)} lacks {missing}: rerun the command)", "-"
        rows.append(f"| {method} | {claim} | {measured} | {verdict} | `{command}` |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    print(claims_table(parser.parse_args().results))


if __name__ == "__main__":
    main()
