"""Fine-tuning quality on SmolLM2-135M: every method on the same data for the same steps, each at the best learning
rate of a small sweep; QPiSSA against QLoRA; forgetting of pretraining-like text.

    pip install -e ".[bench]"; python benchmarks/bench_quality.py [--steps 80] [--out benchmarks/results]

Data: the AFINN-en-165 valence lexicon (3,382 English words, each rated -5..+5 by hand by Finn Arup Nielsen), which
the PyPI package ``afinn`` ships. It is a real, human-labelled dataset that installs offline, its prompts are a few
tokens (so a CPU run stays short), and the answer is one integer, so exact match is unambiguous. Prompt
``Sentiment of "abandon" from -5 to 5:``, answer `` -2``; shuffled once (seed 0) into 400 test, 200 validation and
2,782 training words. Loss on the answer tokens only.

Every run: SmolLM2-135M-Instruct in fp32, all linear layers adapted (r=16; SVFit at its default, the singular values
holding 99% of each layer's energy, and with its top 16 (svfit_r16), Effort
16 minor components, so LoRA, PiSSA, FLoRA and Effort train about the same number of parameters), AdamW at a
constant learning rate, batch 8, ``--steps`` steps, the same batches in the same order. Each method (QLoRA and QPiSSA
too) sweeps its grid (LRS, on the 1-3-10 ladder) and widens it one rate at a time, up to MAX_WIDENINGS times, while
the lowest validation loss sits at an end, so a reported rate has a worse one on each side (the table says where
the widening stopped first). The best rate's adapter is then evaluated on the test
words (loss per answer token and exact match of the greedy answer) and on pretraining-like text (loss per token on
128-token chunks of Python standard-library source, code and docstrings like the corpora SmolLM2 was trained on):
the rise of that loss over the base model's is the forgetting. QLoRA has an nf4 base, QPiSSA an nf4 residual with
QPISSA_ITERS alternations of quantisation and SVD at init; their quantisation error (nuclear norm of W minus what
the model computes with, summed over layers, at init; QPiSSA with 1 and with QPISSA_ITERS iterations) is measured on
the same layers. Effort's weighted regulariser is reported as a share of the loss over training. Writes quality.md,
quality.json and loss_curves.png to ``--out``; ``python benchmarks/claims.py`` reads quality.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "recipes"))

from subspace_peft.methods import QPISSA_RECIPE_ITERS  # noqa: E402

RANK = 16
# Each method's starting grid, on the 1-3-10 ladder; the sweep widens it (up to MAX_WIDENINGS steps) while the best
# rate sits at an end, so every reported rate has a worse one on each side.
LRS = {
    "full": [1e-5, 3e-5, 1e-4],
    "lora": [3e-4, 1e-3, 3e-3],
    "pissa": [1e-4, 3e-4, 1e-3],
    "svfit": [1e-3, 3e-3, 1e-2],
    "svfit_r16": [1e-3, 3e-3, 1e-2],
    "flora": [3e-4, 1e-3, 3e-3],
    "effort": [3e-4, 1e-3, 3e-3],
    "qlora": [3e-4, 1e-3, 3e-3],
    "qpissa": [1e-4, 3e-4, 1e-3],
}
MAX_WIDENINGS = 3
RESULT_FILE = "bench_result.json"
QPISSA_ITERS = QPISSA_RECIPE_ITERS  # the recipe's QPiSSA alternates quantisation and SVD this many times at init
LABELS = {
    "full": "full fine-tuning",
    "lora": "LoRA (peft)",
    "pissa": "PiSSA",
    "svfit": "SVFit (energy 0.99, the default)",
    "svfit_r16": "SVFit (top 16)",
    "flora": "FLoRA",
    "effort": "Effort",
    "qlora": "QLoRA (peft, nf4 base)",
    "qpissa": f"QPiSSA (nf4 residual, {QPISSA_ITERS} iterations)",
}
BATCH = 8
PRETRAIN_MODULES = ["json.decoder", "argparse", "textwrap", "functools", "pathlib", "csv", "statistics", "shutil"]


def afinn_splits() -> dict[str, list[dict]]:
    import afinn

    path = os.path.join(os.path.dirname(afinn.__file__), "data", "AFINN-en-165.txt")
    with open(path, encoding="utf-8") as handle:
        pairs = [line.rstrip("\n").rsplit("\t", 1) for line in handle if line.strip()]
    rows = [{"prompt": f'Sentiment of "{word}" from -5 to 5:', "answer": f" {int(score)}"} for word, score in pairs]
    random.Random(0).shuffle(rows)
    return {"test": rows[:400], "validation": rows[400:600], "train": rows[600:]}


def rotten_tomatoes_splits() -> dict[str, list[dict]]:
    """Rotten Tomatoes critics' snippets (human-written), split by movie and balanced as bench_svfit_cls.py splits
    them (from its default data folder), as prompt/answer rows: ``Review: ...\nSentiment:`` -> `` positive`` or
    `` negative``."""
    from bench_svfit_cls import load_corpus, split_by_movie

    examples, _ = load_corpus(os.path.join(os.path.expanduser("~"), ".cache", "subspace-peft"))
    splits = split_by_movie(examples, {"test": 400, "val": 200, "train": 2000})
    words = {0: " negative", 1: " positive"}
    return {
        name: [{"prompt": f"Review: {text}\nSentiment:", "answer": words[label]} for text, label in splits[key]]
        for name, key in (("test", "test"), ("validation", "val"), ("train", "train"))
    }


TASKS = {"afinn": afinn_splits, "rotten_tomatoes": rotten_tomatoes_splits}
MAX_LENGTH = {"afinn": 64, "rotten_tomatoes": 128}


def pretraining_like_chunks(tokenizer, count: int = 32, length: int = 128) -> list[list[int]]:
    import importlib
    import inspect

    ids: list[int] = []
    for name in PRETRAIN_MODULES:
        ids += tokenizer(inspect.getsource(importlib.import_module(name)), add_special_tokens=False)["input_ids"]
    chunks = [ids[start : start + length] for start in range(0, len(ids) - length, length)]
    return chunks[:: max(1, len(chunks) // count)][:count]


def method_recipe(method: str):
    from finetune import FinetuneRecipe

    quantization = "4bit" if method in ("qlora", "qpissa") else "none"
    base = {"qlora": "lora", "qpissa": "pissa", "svfit_r16": "svfit"}.get(method, method)
    configs = {
        "lora": {"r": RANK, "lora_alpha": RANK, "target_modules": "all-linear"},
        "pissa": {"r": RANK, "lora_alpha": RANK, "target_modules": "all-linear", "init": "randomized", "niter": 4},
        "svfit": {"target_modules": "all-linear"},  # the default: each layer's singular values holding 99% energy
        "svfit_r16": {"r": RANK, "target_modules": "all-linear", "init": "randomized", "niter": 4},
        "flora": {"r": RANK, "target_modules": "all-linear"},
        "effort": {"residual_rank": RANK, "target_modules": "all-linear"},
    }
    config = dict(configs.get(method, configs.get(base, {})))  # qpissa: the recipe adds QPISSA_ITERS iterations
    return FinetuneRecipe(method=base if base != "full" else "lora", method_config=config, quantization=quantization)


def build(method: str, seed: int = 0):
    """(model, tokenizer) ready to train: the base for full fine-tuning, else the wrapped model; ``seed`` draws the
    adapters' random initial values (and, set before training, dropout)."""
    import torch
    from peft import get_peft_model

    from finetune import keep_4bit_layers_on_the_training_path, load_model, peft_config

    torch.manual_seed(seed)
    recipe = method_recipe(method)
    model, tokenizer = load_model(recipe)
    if method != "full":
        model = get_peft_model(model, peft_config(recipe))
        keep_4bit_layers_on_the_training_path(model)
    return model, tokenizer


def train(method: str, lr: float, steps: int, out_dir: str, seed: int = 0, task: str = "afinn") -> dict:
    """Train ``method`` at ``lr`` for ``steps``; ``seed`` sets the initial values, dropout and the data order (seed 0:
    the sweep's runs)."""
    import torch

    from finetune import answer_metrics, collate, tokenize

    model, tokenizer = build(method, seed)
    splits = TASKS[task]()
    train_set = tokenize(splits["train"], tokenizer, MAX_LENGTH[task])
    collator = collate(tokenizer)
    order = random.Random(1 + seed).sample(range(len(train_set)), len(train_set))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    losses, regularisers, start = [], [], time.perf_counter()
    model.train()
    for step in range(steps):
        picks = [order[(step * BATCH + i) % len(order)] for i in range(BATCH)]
        loss = model(**collator([train_set[i] for i in picks])).loss  # the task loss
        loss.backward()  # Effort's layers tie their weighted regularisers to this gradient
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        logged = model.base_model.pop_regulariser_log() if method == "effort" else {}
        losses.append(float(loss))
        regularisers.append(logged.get("effort_loss", 0.0))
    seconds = time.perf_counter() - start
    validation = answer_metrics(model, tokenize(splits["validation"], tokenizer, MAX_LENGTH[task]), collator)
    model.save_pretrained(out_dir)  # the adapter; for full fine-tuning the whole model
    result = {
        "method": method,
        "lr": lr,
        "train_losses": losses,
        "regulariser": regularisers,
        "validation_loss": validation["eval_loss"],
        "validation_exact_match": validation["exact_match"],
        "train_seconds": seconds,
        "trainable": sum(p.numel() for p in trainable),
        "steps": steps,
        "seed": seed,
        "task": task,
    }
    with open(os.path.join(out_dir, RESULT_FILE), "w") as handle:  # a resumed sweep (--runs-root) reads it back
        json.dump(result, handle)
    return result


def finished_run(run_dir: str, method: str, lr: float, steps: int, seed: int = 0, task: str = "afinn") -> dict | None:
    """The result a finished run left in ``run_dir`` (None: not run, or run with other settings)."""
    path = os.path.join(run_dir, RESULT_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        result = json.load(handle)
    settings = (result.get("method"), result.get("lr"), result.get("steps"), result.get("seed", 0))
    same = settings == (method, lr, steps, seed) and result.get("task", "afinn") == task
    return result if same else None


def per_example_scores(model, examples, collator, batch_size: int = 16) -> dict:
    """Per test example: its loss per answer token (the answer and its eos) and whether its greedy answer is exact
    (teacher-forced), the recipe's ``answer_scores``; ``loss`` and ``exact_match`` over all examples are the
    recipe's ``answer_metrics``."""
    from finetune import answer_scores, summarise

    scores = answer_scores(model, examples, collator, batch_size)
    totals = summarise(scores)
    return {
        "losses": scores["losses"],
        "correct": [float(hit) for hit in scores["correct"]],
        "loss": totals["eval_loss"],
        "exact_match": totals["exact_match"],
    }


def evaluate(method: str, run_dir: str | None, task: str = "afinn") -> dict:
    """Test loss, test exact match and pretraining-like loss of a trained run (``run_dir``) or of the base model, in
    total and per test example / per chunk."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune import collate, keep_4bit_layers_on_the_training_path, load_model, tokenize
    from models import smollm2_path

    if method == "full" and run_dir:
        model = AutoModelForCausalLM.from_pretrained(run_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    else:
        model, tokenizer = load_model(method_recipe(method))
        if run_dir:
            import subspace_peft  # noqa: F401  (our adapter types)

            model = PeftModel.from_pretrained(model, run_dir)
            keep_4bit_layers_on_the_training_path(model)
    test = TASKS[task]()["test"]
    chunks = pretraining_like_chunks(tokenizer)
    model.eval()
    with torch.no_grad():
        pretrain = [
            float(model(input_ids=torch.tensor([chunk]), labels=torch.tensor([chunk])).loss) for chunk in chunks
        ]
    scores = per_example_scores(model, tokenize(test, tokenizer, MAX_LENGTH[task]), collate(tokenizer))
    return {
        "test_loss": scores["loss"],
        "exact_match": scores["exact_match"],
        "pretrain_loss": statistics.mean(pretrain),
        "test_losses": scores["losses"],
        "test_correct": scores["correct"],
        "pretrain_losses": pretrain,
    }


def quantisation_errors() -> dict:
    """Nuclear-norm error of QLoRA (W - deq(Q(W))) and QPiSSA (W - deq(Q(W - BA)) - BA) at init, summed over the
    all-linear layers of SmolLM2 at r=16, nf4: plain QPiSSA (1 iteration) and with QPISSA_ITERS alternations."""
    import torch
    from safetensors.torch import load_file
    from torch import nn

    from subspace_peft.linalg import truncated_svd
    from subspace_peft.linalg.settings import SVDSettings
    from subspace_peft.tuners.pissa.bnb import dequantized_weight, quantize_residual
    from subspace_peft.tuners.pissa.quant_iters import alternating_factors

    from models import smollm2_path

    weights = load_file(os.path.join(smollm2_path(), "model.safetensors"))
    errors = {"qlora": 0.0, "qpissa": 0.0, "qpissa_iters": 0.0}

    def nuclear_error(plain, weight, b, a) -> float:
        principal = b @ a
        residual = dequantized_weight(quantize_residual(plain, weight - principal, "nf4"))
        return torch.linalg.matrix_norm(weight - residual - principal, ord="nuc").item()

    for key, weight in weights.items():
        if weight.ndim != 2 or "embed" in key:
            continue
        weight = weight.float()
        plain = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        plain.weight.data.copy_(weight)
        errors["qlora"] += nuclear_error(
            plain, weight, torch.zeros(weight.shape[0], 1), torch.zeros(1, weight.shape[1])
        )
        u, s, vh = truncated_svd(weight, RANK)
        a, b = s.sqrt()[:, None] * vh, u * s.sqrt()  # PiSSA's factors at scale 1: B A = U_r S_r V_r^T
        errors["qpissa"] += nuclear_error(plain, weight, b, a)
        a, b = alternating_factors(plain, (a, b), 1.0, "nf4", QPISSA_ITERS, SVDSettings(method="exact"))
        errors["qpissa_iters"] += nuclear_error(plain, weight, b.float(), a.float())
    return {
        **errors,
        "ratio": errors["qpissa"] / errors["qlora"],
        "ratio_iters": errors["qpissa_iters"] / errors["qlora"],
    }


def ladder_neighbour(lr: float, up: bool) -> float:
    """The next rate up or down the 1-3-10 ladder (1e-4, 3e-4, 1e-3, ...)."""
    mantissa = lr / 10 ** math.floor(math.log10(lr) + 1e-9)
    factor = (3 if mantissa < 2 else 10 / 3) if up else (3 if mantissa > 2 else 10 / 3)
    return float(f"{lr * factor if up else lr / factor:.1g}")


def validation_key(run: dict) -> float:
    loss = run["validation_loss"]
    return loss if math.isfinite(loss) else math.inf  # a diverged run is the worst


def sweep_rates(
    method: str, steps: int, runs_root: str, task: str = "afinn", rates: list[float] | None = None
) -> list[dict]:
    """Train ``method`` at each rate of its grid (``rates``, default ``LRS[method]``), widening the grid by one
    ladder step (at most MAX_WIDENINGS times) while the best validation loss sits at an end; the runs sorted by
    rate, each marked ``interior`` or not."""
    rates, runs = list(rates or LRS[method]), {}
    for _ in range(MAX_WIDENINGS + 1):
        for lr in rates:
            if lr not in runs:
                run_dir = os.path.join(runs_root, f"{method}-{lr:g}")
                reused = finished_run(run_dir, method, lr, steps, task=task)
                runs[lr] = reused or child_call(
                    ["--train", method, str(lr), "--steps", str(steps), "--run-dir", run_dir, "--task", task]
                )
                runs[lr]["run_dir"] = run_dir
                print(
                    f"{method} lr {lr:g}: validation loss {runs[lr]['validation_loss']:.4f} "
                    + ("(reused)" if reused else f"({runs[lr]['train_seconds']:.0f} s)"),
                    file=sys.stderr,
                    flush=True,
                )
        ordered = sorted(runs)
        best_lr = min(ordered, key=lambda lr: validation_key(runs[lr]))
        if best_lr == ordered[0]:
            rates = [ladder_neighbour(best_lr, up=False), *ordered]
        elif best_lr == ordered[-1]:
            rates = [*ordered, ladder_neighbour(best_lr, up=True)]
        else:
            break
    best_lr = min(runs, key=lambda lr: validation_key(runs[lr]))
    for lr, run in runs.items():
        run["interior"] = min(runs) < best_lr < max(runs) if lr == best_lr else None
    return [runs[lr] for lr in sorted(runs)]


def regulariser_share(run: dict) -> dict:
    """Effort's weighted regulariser as a share of the loss (task + regulariser), over the first, middle and last
    10 steps, and its largest single-step share."""
    shares = [
        reg / (task + reg) if task + reg > 0 else 0.0 for task, reg in zip(run["train_losses"], run["regulariser"])
    ]
    middle = len(shares) // 2
    return {
        "first": statistics.mean(shares[:10]),
        "middle": statistics.mean(shares[max(0, middle - 5) : middle + 5]),
        "last": statistics.mean(shares[-10:]),
        "max": max(shares),
    }


def child_call(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])


def plot_curves(best: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for method, run in best.items():
        losses = run["train_losses"]
        window = 10  # moving average over 10 steps (80 examples): single batches of 8 words are noisy
        smooth = [statistics.mean(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
        axis.plot(range(1, len(losses) + 1), smooth, label=f"{LABELS[method]} (lr {run['lr']:g})")
    axis.set(
        xlabel="step (batch 8)",
        ylabel="task loss per answer token (10-step mean)",
        yscale="log",
        title="SmolLM2-135M on AFINN-165 word valence, each method at its best learning rate",
    )
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--methods", nargs="+", default=list(LRS))
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--train", nargs=2, metavar=("METHOD", "LR"))
    parser.add_argument("--evaluate", nargs="+", metavar=("METHOD", "RUN_DIR"))
    parser.add_argument("--run-dir")
    parser.add_argument("--quant-errors", action="store_true")
    parser.add_argument(
        "--runs-root",
        help="keep every run here and reuse the finished ones (a killed sweep resumes); default: a temporary folder",
    )
    parser.add_argument("--seed", type=int, default=0, help="--train: initial values, dropout and data order")
    parser.add_argument("--task", choices=sorted(TASKS), default="afinn", help="--train and --evaluate: the data")
    args = parser.parse_args()
    if args.train:
        method, lr = args.train[0], float(args.train[1])
        print("RESULT " + json.dumps(train(method, lr, args.steps, args.run_dir, args.seed, args.task)))
        return
    if args.evaluate:
        run_dir = args.evaluate[1] if len(args.evaluate) > 1 else None
        print("RESULT " + json.dumps(evaluate(args.evaluate[0], run_dir, args.task)))
        return
    if args.quant_errors:
        print("RESULT " + json.dumps(quantisation_errors()))
        return

    from harness import markdown_table

    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    runs_root = args.runs_root or tempfile.mkdtemp(prefix="bench_quality_")
    os.makedirs(runs_root, exist_ok=True)
    sweep: dict[str, list[dict]] = {}
    best: dict[str, dict] = {}
    for method in args.methods:
        sweep[method] = sweep_rates(method, args.steps, runs_root)
        best[method] = min(sweep[method], key=validation_key)
        for run in sweep[method]:
            if run is not best[method] and not args.runs_root:
                shutil.rmtree(run["run_dir"], ignore_errors=True)
    base = child_call(["--evaluate", "lora"])
    for method, run in best.items():
        run.update(child_call(["--evaluate", method, run["run_dir"]]))
        print(f"{method}: {run['test_loss']:.4f} / {run['exact_match']:.3f}", file=sys.stderr, flush=True)
    errors = child_call(["--quant-errors"])

    plot_curves(best, os.path.join(args.out, "loss_curves.png"))
    sweep_table = markdown_table(
        ["method", "best lr", "worse rate on both sides", "validation loss / exact match per rate (best in bold)"],
        [
            [
                LABELS[m],
                f"{best[m]['lr']:g}",
                "yes" if best[m]["interior"] else "no (widening stopped)",
                "; ".join(
                    (f"**{r['lr']:g}: {r['validation_loss']:.4f} / {r['validation_exact_match']:.2f}**")
                    if r is best[m]
                    else f"{r['lr']:g}: {r['validation_loss']:.4f} / {r['validation_exact_match']:.2f}"
                    for r in runs
                ),
            ]
            for m, runs in sweep.items()
        ],
    )
    result_rows = [
        [
            "base model (no fine-tuning)",
            "-",
            "-",
            f"{base['test_loss']:.4f}",
            f"{base['exact_match']:.3f}",
            f"{base['pretrain_loss']:.4f}",
            "-",
        ]
    ]
    for method, run in best.items():
        result_rows.append(
            [
                LABELS[method],
                f"{run['trainable']:,}",
                f"{run['lr']:g}",
                f"{run['test_loss']:.4f}",
                f"{run['exact_match']:.3f}",
                f"{run['pretrain_loss']:.4f}",
                f"{run['pretrain_loss'] - base['pretrain_loss']:+.4f}",
            ]
        )
    results_table = markdown_table(
        [
            "method",
            "trainable params",
            "best lr",
            "test loss",
            "test exact match",
            "pretraining-like loss",
            "forgetting (rise)",
        ],
        result_rows,
    )
    quant_table = markdown_table(
        ["", "QLoRA", "QPiSSA (1 iteration)", f"QPiSSA ({QPISSA_ITERS} iterations)"],
        [
            [
                "nuclear-norm quantisation error at init (sum over layers)",
                f"{errors['qlora']:.1f}",
                f"{errors['qpissa']:.1f} ({errors['ratio']:.3f}x)",
                f"{errors['qpissa_iters']:.1f} ({errors['ratio_iters']:.3f}x)",
            ],
            [
                "test loss after the same steps, each at its best rate",
                f"{best['qlora']['test_loss']:.4f}" if "qlora" in best else "-",
                "-",
                f"{best['qpissa']['test_loss']:.4f}" if "qpissa" in best else "-",
            ],
        ],
    )
    shares = {m: regulariser_share(run) for m, run in best.items() if any(run["regulariser"])}
    share_lines = "".join(
        f"- {LABELS[m]}: the weighted regulariser was {share['first']:.1%} of the loss (task + regulariser) over the "
        f"first 10 steps, {share['middle']:.1%} mid-run, {share['last']:.1%} over the last 10 (largest single "
        f"step {share['max']:.1%}).\n"
        for m, share in shares.items()
    )
    report = (
        f"SmolLM2-135M-Instruct, AFINN-165 word valence, {args.steps} steps of batch 8, all linear layers, "
        f"r={RANK}. Wall time {time.perf_counter() - started:.0f} s.\n\n"
        f"Validation loss / exact match per learning rate (the sweep; the lowest loss picks the "
        f"rate):\n\n{sweep_table}\n\n"
        f"Each method at its best learning rate (400 test words; pretraining-like text: 32 chunks of 128 "
        f"tokens of Python standard-library source):\n\n{results_table}\n\n"
        f"QPiSSA against QLoRA (nf4, r={RANK}):\n\n{quant_table}\n"
        + (f"\nRegulariser share at the best rate:\n\n{share_lines}" if share_lines else "")
    )
    with open(os.path.join(args.out, "quality.md"), "w") as handle:
        handle.write(report)
    with open(os.path.join(args.out, "quality.json"), "w") as handle:
        json.dump(
            {
                "sweep": sweep,
                "best": best,
                "base": base,
                "quantisation_errors": errors,
                "regulariser_share": shares,
                "steps": args.steps,
            },
            handle,
            indent=1,
        )
    print(report)


if __name__ == "__main__":
    main()
