"""The quality benchmark's learning-rate sweep widens its grid until the best rate is inside it, and the claims
table reads the numbers the benchmarks wrote (no model is trained here: the training runs are stubbed)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)

import bench_quality  # noqa: E402
import bench_quality_seeds  # noqa: E402
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


TRAINABLE = {"lora": 4_884_480, "pissa": 4_884_480, "svfit": 80_529, "flora": 4_938_240, "effort": 4_887_840}


def _seeded(tmp_path, factors: dict, rises: dict, seeds: int = 3, task: str = "afinn", steps: int = 80) -> None:
    """A bench_quality_seeds.py report: per-example test losses of each method = LoRA's x ``factors[method]`` (plus
    a little per-seed noise), pretraining-like losses = the base's + ``rises[method]``."""
    rng = np.random.default_rng(0)
    lora = rng.gamma(2.0, 0.2, (seeds, 200))
    base_chunks = rng.uniform(2.0, 3.0, 32)
    runs = {}
    for method, factor in factors.items():
        losses = lora * factor + rng.normal(0, 0.005, lora.shape)
        runs[method] = [
            {
                "seed": seed,
                "trainable": TRAINABLE.get(method, 4_884_480),
                "test_losses": losses[seed].tolist(),
                "pretrain_losses": (base_chunks + rises[method] + rng.normal(0, 0.002, 32)).tolist(),
            }
            for seed in range(seeds)
        ]
    report = {
        "command": f"python benchmarks/bench_quality_seeds.py --task {task} --steps {steps}",
        "task": task,
        "steps": steps,
        "seeds": list(range(seeds)),
        "base": {"pretrain_loss": float(base_chunks.mean()), "pretrain_losses": base_chunks.tolist()},
        "runs": runs,
    }
    (tmp_path / f"quality_seeds_{task}_{steps}.json").write_text(json.dumps(report))
    (tmp_path / "quality.json").write_text(json.dumps({"quantisation_errors": {"ratio": 0.93, "ratio_iters": 0.84}}))


def _rows(tmp_path) -> dict:
    return {line.split(" | ")[0].lstrip("| "): line for line in claims.claims_table(str(tmp_path)).splitlines()[2:]}


FACTORS = {"lora": 1.0, "pissa": 0.9, "svfit": 1.01, "flora": 1.3, "effort": 1.0, "qlora": 1.1, "qpissa": 1.0}
RISES = {"lora": 0.3, "pissa": 0.4, "svfit": 0.1, "flora": 0.3, "effort": 0.2, "qlora": 0.5, "qpissa": 0.5}


def test_the_fine_tuning_claims_have_seeds_intervals_and_verdicts(tmp_path):
    _seeded(tmp_path, FACTORS, RISES)
    rows = _rows(tmp_path)
    assert "| holds |" in rows["PiSSA"] and "afinn, 80 steps: test loss PiSSA" in rows["PiSSA"]
    assert "3 seeds each" in rows["PiSSA"]
    assert "| holds |" in rows["QPiSSA"] and "0.84x (5 iterations" in rows["QPiSSA"]
    assert "| holds |" in rows["SVFit"] and "with 1/61 of its trained numbers (holds)" in rows["SVFit"]
    assert "| does not hold |" in rows["FLoRA"] and "1.30x LoRA's" in rows["FLoRA"]  # the interval lies above 1.05
    assert "| holds |" in rows["Effort"] and "forgetting Effort +0.200" in rows["Effort"]
    assert "not measured (concrete_ta.json absent)" in rows["Concrete Task Arithmetic"]


def test_a_fine_tuning_claim_must_hold_in_every_setting(tmp_path):
    _seeded(tmp_path, FACTORS, RISES)
    _seeded(tmp_path, {**FACTORS, "pissa": 1.0, "effort": 1.0}, {**RISES, "effort": 0.35}, steps=300)
    rows = _rows(tmp_path)
    assert "afinn, 300 steps" in rows["PiSSA"] and "| cannot tell |" in rows["PiSSA"]  # equal at 300 steps
    assert "| does not hold |" in rows["Effort"]  # forgets more than LoRA at 300 steps
    seeded = "python benchmarks/bench_quality_seeds.py --task afinn --steps 80; python benchmarks/bench_quality_seeds"
    assert rows["PiSSA"].endswith(f"| `{seeded}.py --task afinn --steps 300` |")  # the command of each setting
    assert f"`python benchmarks/bench_quality.py; {seeded}.py --task afinn --steps 300` |" in rows["QPiSSA"]
    _seeded(tmp_path, FACTORS, RISES, seeds=2, steps=300)
    assert "| cannot tell |" in _rows(tmp_path)["PiSSA"]  # two seeds: no verdict


def test_a_setting_run_for_some_methods_counts_for_their_claims_only(tmp_path):
    _seeded(tmp_path, FACTORS, RISES)
    _seeded(tmp_path, {"lora": 1.0, "pissa": 1.0}, RISES, steps=300)  # --methods lora pissa
    rows = _rows(tmp_path)
    assert "afinn, 300 steps" in rows["PiSSA"] and "| cannot tell |" in rows["PiSSA"]
    for method in ("QPiSSA", "SVFit", "FLoRA", "Effort"):
        assert "afinn, 80 steps" in rows[method] and "300 steps" not in rows[method]
        assert "--steps 300" not in rows[method]  # nor in its command
    assert "| holds |" in rows["SVFit"] and "| holds |" in rows["Effort"]
    _seeded(tmp_path, {"pissa": 1.0}, RISES)  # no setting holds LoRA: not measured, not a crash
    assert "not measured" in _rows(tmp_path)["SVFit"]


def test_a_results_file_from_an_older_benchmark_is_not_measured(tmp_path):
    _seeded(tmp_path, FACTORS, RISES)
    (tmp_path / "quality.json").write_text(json.dumps({"quantisation_errors": {"ratio": 0.93}}))
    rows = _rows(tmp_path)
    assert "not measured (quality.json, quality_seeds_*.json lacks 'ratio_iters': rerun the command)" in rows["QPiSSA"]
    assert "| holds |" in rows["PiSSA"]


def _setting(methods: dict, command: str, base_losses: list[float], seconds: float) -> dict:
    """A bench_quality_seeds.py report of one setting: per method (name -> its rate), three seeds."""
    return {
        "command": command,
        "task": "rotten_tomatoes",
        "steps": 80,
        "seeds": [0, 1, 2],
        "rates": dict(methods),
        "rate_source": "swept again at seed 0 for this task and budget (validation loss)",
        "sweeps": {method: [{"lr": lr, "validation_loss": 0.2}] for method, lr in methods.items()},
        "base": {"test_losses": base_losses},
        "runs": {
            method: [{"seed": seed, "lr": lr, "train_seconds": 10.0} for seed in range(3)]
            for method, lr in methods.items()
        },
        "seconds": seconds,
    }


def test_add_keeps_the_results_file_s_other_methods_and_names_both_commands():
    earlier = _setting(
        {"lora": 3e-4, "pissa": 3e-5, "effort": 1e-2}, "python bench --methods lora pissa effort ", [1.0, 2.0], 600
    )
    report = _setting(
        {"effort": 1e-3, "qlora": 3e-4}, "python bench --methods effort qlora --add", [1.0, 2.0 + 1e-6], 400
    )
    merged = bench_quality_seeds.with_earlier_methods(report, earlier)
    assert list(merged["runs"]) == ["lora", "pissa", "effort", "qlora"]  # the benchmark's order of methods
    assert merged["runs"]["lora"] is earlier["runs"]["lora"] and merged["runs"]["effort"] is report["runs"]["effort"]
    assert merged["rates"] == {"lora": 3e-4, "pissa": 3e-5, "effort": 1e-3, "qlora": 3e-4}  # effort's run replaced
    assert list(merged["sweeps"]) == ["lora", "pissa", "effort", "qlora"]
    assert merged["command"] == "python bench --methods lora pissa effort; python bench --methods effort qlora --add"
    assert merged["seconds"] == 1000 and merged["base"] is report["base"]
    assert "lora" not in report["runs"]  # the call's own report is left as it was


def test_add_refuses_another_setting_or_a_changed_evaluation():
    earlier = _setting({"lora": 3e-4}, "python bench", [1.0, 2.0], 600)
    report = _setting({"effort": 1e-3}, "python bench --add", [1.0, 2.0], 400)
    with pytest.raises(SystemExit, match="holds steps 80, this call 300; run with the same setting or without --add"):
        bench_quality_seeds.with_earlier_methods({**report, "steps": 300}, earlier)
    drifted = {**report, "base": {"test_losses": [1.0, 2.01]}}
    with pytest.raises(SystemExit, match=r"differ from the results file's \(by up to 0.01\).*rerun every method"):
        bench_quality_seeds.with_earlier_methods(drifted, earlier)
    with pytest.raises(SystemExit, match="scored 2 test examples, this call 1: the task's split changed"):
        bench_quality_seeds.with_earlier_methods({**report, "base": {"test_losses": [1.0]}}, earlier)


@pytest.mark.parametrize("text", ["effort", "bogus=1e-3", "lora=-1e-3", "lora=fast", "lora=nan", "lora=inf"])
def test_a_fixed_rate_is_method_equals_a_positive_rate(text):
    assert bench_quality_seeds.method_rate("effort=3e-4") == ("effort", 3e-4)
    with pytest.raises(
        argparse.ArgumentTypeError, match="write METHOD=LR with a positive finite rate.*e.g. effort=3e-4"
    ):
        bench_quality_seeds.method_rate(text)


def test_fixed_rates_are_not_swept_and_the_others_are(monkeypatch, tmp_path):
    (tmp_path / "quality.json").write_text(json.dumps({"rates": {"lora": 1e-3, "effort": 1e-3}}))
    monkeypatch.setattr(bench_quality_seeds, "swept_rate", lambda method, lr, *_: (lr / 10, [{"lr": lr / 10}]))
    args = argparse.Namespace(
        methods=["lora", "effort"], rates=[("effort", 3e-4)], rates_from=str(tmp_path / "quality.json"), sweep=True,
        steps=80, task="rotten_tomatoes",
    )  # fmt: skip
    rates, sweeps, source = bench_quality_seeds.chosen_rates(args, str(tmp_path))
    assert rates == {"lora": pytest.approx(1e-4), "effort": 3e-4} and list(sweeps) == ["lora"]
    assert source == "swept again at seed 0 for this task and budget (validation loss); effort 0.0003 set by --rates"
    args.rates, args.rates_from = [("lora", 3e-4), ("effort", 3e-4)], str(tmp_path / "absent.json")
    assert bench_quality_seeds.chosen_rates(args, str(tmp_path)) == (
        {"lora": 3e-4, "effort": 3e-4},
        {},
        "lora 0.0003, effort 0.0003 set by --rates",
    )


@pytest.mark.parametrize(
    "words, message",
    [
        (["--rates", "effort=3e-4"], "--rates: give --out another folder; claims.py reads benchmarks/results"),
        (["--methods", "lora", "--rates", "effort=3e-4", "--out", "x"], "--rates sets effort, which --methods does"),
    ],
)
def test_fixed_rates_are_refused_before_any_training(words, message):
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, "bench_quality_seeds.py"), *words], capture_output=True, text=True
    )
    assert proc.returncode == 2 and message in proc.stderr


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


def _concrete_adamerging_row(tmp_path, ours_right: list[int], adamerging_right: list[int], reverse=False) -> str:
    """Two tasks of 100 test examples; TIES right on the first 60 of each, seed i's merges on the first n
    (``reverse``: the file lists the runs in reverse, as separate processes' runs merged may come)."""

    def run(method, seed, right):
        correct = {"a": [1] * right + [0] * (100 - right), "b": [1] * right + [0] * (100 - right)}
        return {"method": method, "seed": seed, "correct": correct}

    runs = [run("ties", None, 60)]
    for seed, (ours, theirs) in enumerate(zip(ours_right, adamerging_right)):
        runs += [run("concrete_adamerging", seed, ours), run("adamerging", seed, theirs)]
    runs = runs[:1] + runs[:0:-1] if reverse else runs
    (tmp_path / "concrete_adamerging.json").write_text(json.dumps({"runs": runs}))
    return _rows(tmp_path)["Concrete AdaMerging"]


def test_the_concrete_adamerging_claim_is_paired_against_both_rivals(tmp_path):
    (tmp_path / "merge.json").write_text(
        json.dumps(
            {
                "methods": {
                    m: {"average": a} for m, a in (("concrete_adamerging", 0.9), ("adamerging", 0.8), ("ties", 0.85))
                }
            }
        )
    )
    assert (
        "| holds (1 run, no interval) | `python benchmarks/bench_merge.py` |" in _rows(tmp_path)["Concrete AdaMerging"]
    )
    row = _concrete_adamerging_row(tmp_path, [80, 82, 81], [70, 71, 72])
    assert "| holds | `python benchmarks/bench_concrete_adamerging.py` |" in row and "3 seeds" in row
    assert "| cannot tell |" in _concrete_adamerging_row(tmp_path, [80, 82, 81], [80, 82, 81])  # equal to AdaMerging
    assert "| does not hold |" in _concrete_adamerging_row(tmp_path, [50, 52, 51], [70, 71, 72])
    paired = _concrete_adamerging_row(tmp_path, [80, 62, 91], [75, 60, 85])  # paired by seed, in any file order
    assert _concrete_adamerging_row(tmp_path, [80, 62, 91], [75, 60, 85], reverse=True) == paired
