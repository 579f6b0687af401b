"""The held-out metrics recipes/finetune.py takes before and after training (phase 5): loss and exact match."""

from __future__ import annotations

import json

from data import collate


def answer_metrics(model, examples: list[dict], collator, batch_size: int = 16) -> dict:
    """``eval_loss``: mean loss per answer token over ``examples`` (from :func:`tokenize`, a Dataset or a list);
    ``exact_match``: share of examples whose greedy continuation is the answer (chat data: every assistant token).
    One forward pass per batch gives both (the same on every process).

    Exact match is teacher-forced: greedy decoding produces the answer exactly when each answer token is the argmax
    given the prompt and the answer tokens before it, which is what is checked (ties aside).
    """
    import torch

    model.eval()
    total = count = 0.0
    hits = 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = [examples[index] for index in range(start, min(start + batch_size, len(examples)))]
            batch = {k: v.to(model.device) for k, v in collator(chunk).items()}
            outputs = model(**batch)
            tokens = float((batch["labels"][:, 1:] != -100).sum())
            total += float(outputs.loss) * tokens
            count += tokens
            predicted = outputs.logits.argmax(-1)
            for row, example in enumerate(chunk):
                # labels[t] is predicted at position t - 1; the answer's first token follows the prompt's last
                positions = (batch["labels"][row] != -100).nonzero().flatten()[: example["answer_length"]]
                if len(positions):
                    hits += bool((predicted[row, positions - 1] == batch["labels"][row, positions]).all())
    return {"eval_loss": total / count, "exact_match": hits / len(examples)}


def evaluate(model, eval_set, tokenizer, when: str, gather_partitioned: bool = False) -> dict:
    """:func:`answer_metrics` of the held-out set, printed as ``<when>: {...}``. ``gather_partitioned``: the model is
    outside DeepSpeed's engine (before training), so ZeRO-3 partitioned parameters are gathered for the evaluation
    (on every rank, as the gathering is collective); inside the engine its hooks gather them layer by layer."""
    partitioned = [param for param in model.parameters() if hasattr(param, "ds_id")] if gather_partitioned else []
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned):
            metrics = answer_metrics(model, eval_set, collate(tokenizer))
    else:
        metrics = answer_metrics(model, eval_set, collate(tokenizer))
    print(f"{when}: {json.dumps(metrics)}")
    return metrics
