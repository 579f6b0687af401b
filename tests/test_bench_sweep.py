"""The quality benchmark's learning-rate sweep widens its grid until the best rate is inside it, and the claims
table reads the numbers the benchmarks wrote (no model is trained here: the training runs are stubbed)."""

from __future__ import annotations

import json
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)

import bench_quality  # noqa: E402
import claims  # noqa: E402


@pytest.mark.parametrize(
    "lr, up, expected",
    [(1e-3, True, 3e-3), (3e-3, True, 1e-2), (1e-3, False, 3e-4), (3e-4, False, 1e-4), (1e-5, False, 3e-6)],
)
def test_the_ladder_steps_through_one_and_three(lr, up, expected):
    assert bench_quality.ladder_neighbour(lr, up) == pytest.approx(expected, rel=1e-12)


def _stub_training(monkeypatch, validation_loss):
    """child_call returning ``validation_loss(lr)`` for every --train call; the rates asked for, in order."""
    asked = []

    def child_call(args):
        lr = float(args[2])
        asked.append(lr)
        return {"lr": lr, "validation_loss": validation_loss(lr), "validation_exact_match": 0.0, "train_seconds": 0}

    monkeypatch.setattr(bench_quality, "child_call", child_call)
    monkeypatch.setitem(bench_quality.LRS, "lora", [3e-4, 1e-3, 3e-3])
    return asked


def test_the_sweep_widens_upwards_until_the_best_rate_is_inside(monkeypatch, tmp_path):
    import math

    asked = _stub_training(monkeypatch, lambda lr: (math.log10(lr) - math.log10(3e-2)) ** 2)  # best at 3e-2
    runs = bench_quality.sweep_rates("lora", 80, str(tmp_path))
    assert asked == pytest.approx([3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    best = min(runs, key=bench_quality.validation_key)
    assert best["lr"] == pytest.approx(3e-2) and best["interior"] is True
    assert [r["lr"] for r in runs] == sorted(r["lr"] for r in runs)


def test_a_resumed_sweep_reuses_the_finished_runs_with_the_same_settings(monkeypatch, tmp_path):
    asked = _stub_training(monkeypatch, lambda lr: abs(lr - 1e-3))  # best at 1e-3: no widening
    finished = {"method": "lora", "lr": 3e-4, "steps": 80, "validation_loss": 0.5, "validation_exact_match": 0.1}
    os.makedirs(tmp_path / "lora-0.0003")
    (tmp_path / "lora-0.0003" / bench_quality.RESULT_FILE).write_text(json.dumps(finished))
    other_steps = {**finished, "lr": 3e-3, "steps": 20}  # run with other settings: trained again
    os.makedirs(tmp_path / "lora-0.003")
    (tmp_path / "lora-0.003" / bench_quality.RESULT_FILE).write_text(json.dumps(other_steps))
    runs = bench_quality.sweep_rates("lora", 80, str(tmp_path))
    assert asked == pytest.approx([1e-3, 3e-3])
    assert runs[0]["validation_loss"] == 0.5 and runs[0]["run_dir"] == str(tmp_path / "lora-0.0003")


def test_the_sweep_stops_widening_after_its_limit_and_says_so(monkeypatch, tmp_path):
    asked = _stub_training(monkeypatch, lambda lr: lr)  # ever better at lower rates
    runs = bench_quality.sweep_rates("lora", 80, str(tmp_path))
    assert len(asked) == 3 + bench_quality.MAX_WIDENINGS
    best = min(runs, key=bench_quality.validation_key)
    assert best["lr"] == pytest.approx(min(asked)) and best["interior"] is False


def test_a_diverged_run_counts_as_the_worst(monkeypatch, tmp_path):
    _stub_training(monkeypatch, lambda lr: float("nan") if lr > 2e-3 else abs(lr - 1e-3))
    runs = bench_quality.sweep_rates("lora", 80, str(tmp_path))
    best = min(runs, key=bench_quality.validation_key)
    assert best["lr"] == pytest.approx(1e-3) and best["interior"] is True


def test_regulariser_share_over_training():
    run = {"train_losses": [1.0] * 80, "regulariser": [0.0] * 40 + [1.0] * 40}
    share = bench_quality.regulariser_share(run)
    assert share["first"] == 0.0 and share["last"] == 0.5 and share["max"] == 0.5
    assert share["middle"] == pytest.approx(0.25)  # steps 35-44: five of each


def _quality(tmp_path, svfit_loss, effort_rise):
    best = {
        "lora": {"test_loss": 0.40, "trainable": 4_884_480, "pretrain_loss": 3.0},
        "pissa": {"test_loss": 0.38, "trainable": 4_884_480, "pretrain_loss": 3.3},
        "svfit": {"test_loss": svfit_loss, "trainable": 80_529, "pretrain_loss": 2.8},
        "flora": {"test_loss": 0.48, "trainable": 4_938_240, "pretrain_loss": 3.0},
        "effort": {"test_loss": 0.41, "trainable": 4_887_840, "pretrain_loss": 2.7 + effort_rise},
        "qlora": {"test_loss": 0.41, "trainable": 4_884_480, "pretrain_loss": 3.1},
        "qpissa": {"test_loss": 0.40, "trainable": 4_884_480, "pretrain_loss": 3.6},
    }
    data = {
        "best": best,
        "base": {"pretrain_loss": 2.7},
        "quantisation_errors": {"ratio": 0.93, "ratio_iters": 0.84},
        "regulariser_share": {"effort": {"first": 0.01, "middle": 0.05, "last": 0.07, "max": 0.1}},
    }
    (tmp_path / "quality.json").write_text(json.dumps(data))


def test_the_claims_table_reads_the_verdicts_from_the_numbers(tmp_path):
    _quality(tmp_path, svfit_loss=0.41, effort_rise=0.05)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in claims.claims_table(str(tmp_path)).splitlines()[2:]}
    one_run = "| holds (1 run, no interval) |"
    assert one_run in rows["PiSSA"] and one_run in rows["QPiSSA"]
    assert "1/61 of LoRA's" in rows["SVFit"] and one_run in rows["SVFit"]  # 0.41 / 0.40 = 1.025 <= 1.05
    assert one_run in rows["Effort"] and "+0.050" in rows["Effort"]
    assert "not measured (concrete_ta.json absent)" in rows["Concrete Task Arithmetic"]
    _quality(tmp_path, svfit_loss=0.55, effort_rise=2.0)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in claims.claims_table(str(tmp_path)).splitlines()[2:]}
    assert "| does not hold (1 run, no interval) |" in rows["SVFit"]
    assert "| does not hold (1 run, no interval) |" in rows["Effort"]


def test_a_results_file_from_an_older_benchmark_is_not_measured(tmp_path):
    _quality(tmp_path, svfit_loss=0.41, effort_rise=0.05)
    data = json.loads((tmp_path / "quality.json").read_text())
    del data["quantisation_errors"]["ratio_iters"]  # written before QPiSSA's iterations were measured
    (tmp_path / "quality.json").write_text(json.dumps(data))
    rows = {line.split(" | ")[0].lstrip("| "): line for line in claims.claims_table(str(tmp_path)).splitlines()[2:]}
    assert "not measured (quality.json lacks 'ratio_iters': rerun the command)" in rows["QPiSSA"]
    assert "| holds (1 run, no interval) |" in rows["PiSSA"]


def _concrete_ta_report(tmp_path, right_per_seed: list[int]) -> dict:
    """Two tasks of 100 test examples; task arithmetic right on the first 60 of each, seed i's merge on the first
    right_per_seed[i]."""

    def correct(right):
        return {"a": [1] * right + [0] * (100 - right), "b": [1] * right + [0] * (100 - right)}

    report = {
        "baselines": {"task arithmetic (lambda 0.6, chosen)": {"average": 0.6, "correct": correct(60)}},
        "runs": [
            {
                "setting": "reference",
                "seed": seed,
                "scaling": 0.6,
                "returned_final_mask": "sample",
                "final": {"sample": {"correct": correct(right)}},
            }
            for seed, right in enumerate(right_per_seed)
        ],
    }
    (tmp_path / "concrete_ta.json").write_text(json.dumps(report))
    rows = {line.split(" | ")[0].lstrip("| "): line for line in claims.claims_table(str(tmp_path)).splitlines()[2:]}
    return rows["Concrete Task Arithmetic"]


def test_the_concrete_ta_claim_has_seeds_an_interval_and_a_verdict(tmp_path):
    assert "| holds |" in _concrete_ta_report(tmp_path, [70, 72, 71])
    row = _concrete_ta_report(tmp_path, [50, 52, 49])
    assert "| does not hold |" in row and "3 seeds" in row and "difference -0.097" in row
    assert "| cannot tell |" in _concrete_ta_report(tmp_path, [80])  # one seed: no verdict


def test_the_flora_convolution_claim_combines_the_budgets(tmp_path):
    def row(verdicts):
        report = {
            "settings": {"seeds": 10},
            "methods": {f"flora-{b}": {"budget": b} for b in ("small", "large")},
            "comparisons": {
                f"flora-{b}": {"difference": 0.001, "interval_95": [-0.02, 0.02], "verdict": v, "primary": True}
                for b, v in zip(("small", "large"), verdicts)
            },
        }
        (tmp_path / "flora_conv.json").write_text(json.dumps(report))
        table = claims.claims_table(str(tmp_path)).splitlines()[2:]
        return next(line for line in table if line.startswith("| FLoRA, convolutions"))

    assert "| holds |" in row(["holds", "holds"]) and "small: +0.10 points [-2.00, +2.00] (holds)" in row(["holds"] * 2)
    assert "| cannot tell |" in row(["holds", "cannot tell"])
    assert "| does not hold |" in row(["does not hold", "cannot tell"])


def test_the_svfit_classification_claim_reads_the_default_s_verdict(tmp_path):
    def row(energy_verdict):
        verdict = {"ratio": 0.99, "ratio_interval_95": [0.96, 1.02], "factor_without_head": 23.4}
        report = {
            "settings": {"seeds": 3},
            "summary": {key: {"mean": 0.77} for key in ("lora", "svfit_energy", "svfit_r16")},
            "verdicts": {
                "svfit_energy": {**verdict, "without_head": energy_verdict},
                "svfit_r16": {**verdict, "without_head": "holds"},
            },
        }
        (tmp_path / "svfit_cls.json").write_text(json.dumps(report))
        table = claims.claims_table(str(tmp_path)).splitlines()[2:]
        return next(line for line in table if line.startswith("| SVFit, classification"))

    assert row("holds").endswith("| holds | `python benchmarks/bench_svfit_cls.py` |")
    assert "| cannot tell |" in row("cannot tell") and "ratio to LoRA 0.990 [0.960, 1.020] at 1/23" in row("holds")
