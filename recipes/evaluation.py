"""The held-out metrics recipes/finetune.py takes before and after training (phase 5): loss and exact match."""

from __future__ import annotations

import json

from data import collate


def answer_scores(model, examples: list[dict], collator, batch_size: int = 16) -> dict:
    """Per example (from :func:`tokenize`, a Dataset or a list): ``losses``, its mean loss per answer token (the
    answer and its eos; chat data: the assistant turns), ``tokens``, how many, and ``correct``, whether its greedy
    continuation is the answer. One forward pass per batch gives all three (the same on every process).

    Exact match is teacher-forced: greedy decoding produces the answer exactly when each answer token is the argmax
    given the prompt and the answer tokens before it, which is what is checked (ties aside).
    """
    import torch

    model.eval()
    losses, tokens, correct = [], [], []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = [examples[index] for index in range(start, min(start + batch_size, len(examples)))]
            batch = {k: v.to(model.device) for k, v in collator(chunk).items()}
            logits = model(**batch).logits[:, :-1].float()
            labels = batch["labels"][:, 1:]  # labels[t] is predicted at position t - 1
            answer = labels != -100
            token_loss = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), labels.clamp(min=0), reduction="none"
            )
            hit = logits.argmax(-1) == labels
            for row, example in enumerate(chunk):
                count = int(answer[row].sum())
                losses.append(float((token_loss[row] * answer[row]).sum()) / max(count, 1))
                tokens.append(count)
                positions = answer[row].nonzero().flatten()[: example["answer_length"]]  # the answer, not its eos
                correct.append(len(positions) > 0 and bool(hit[row, positions].all()))
    return {"losses": losses, "tokens": tokens, "correct": correct}


def summarise(scores: dict) -> dict:
    """``eval_loss``: mean loss per answer token over the examples of :func:`answer_scores`; ``exact_match``: the
    share whose greedy continuation is the answer."""
    total = sum(loss * count for loss, count in zip(scores["losses"], scores["tokens"]))
    return {"eval_loss": total / sum(scores["tokens"]), "exact_match": sum(scores["correct"]) / len(scores["correct"])}


def answer_metrics(model, examples: list[dict], collator, batch_size: int = 16) -> dict:
    """:func:`summarise` of :func:`answer_scores`: held-out loss per answer token and exact match."""
    return summarise(answer_scores(model, examples, collator, batch_size))


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
