"""The recipe's data: rows read and checked (every problem a one-line :class:`RecipeError` naming the file,
line and field), tokenised with ``datasets.Dataset.map`` and batched with transformers' ``DataCollatorForSeq2Seq``.

Two row formats, loss on the answer only in both:

- prompt / answer: two text columns (``prompt_field``, ``answer_field``); the model reads prompt + answer + eos and
  is trained on the answer and the eos;
- chat: a ``messages_field`` column holding a conversation, a list of ``{"role": ..., "content": ...}``, rendered
  with the tokenizer's chat template; the model is trained on the assistant turns only (each turn's text as the
  template renders it, its end-of-turn token included), not on the system and user turns nor on the template's
  "assistant" header.

``builtin:arithmetic`` is the embedded default data set, generated (no download): two- and three-digit additions as
question / answer pairs, a task SmolLM2-135M gets partly right before fine-tuning, so that the metric can move both
ways; ``builtin:arithmetic-chat`` is the same task as user / assistant conversations.
"""

from __future__ import annotations

import os
import random
import sys
from typing import Optional

from subspace_peft.recipe_tools.config import RecipeError, located, one_line, read_json_rows

BUILTIN = ("builtin:arithmetic", "builtin:arithmetic-chat")
ROLES = ("system", "user", "assistant", "tool")


def arithmetic_rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        rows.append({"prompt": f"Question: What is {a} + {b}?\nAnswer:", "answer": f" {a + b}"})
    return rows


def arithmetic_chat_rows(count: int, seed: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": row["prompt"].split("\n")[0][len("Question: ") :]},
                {"role": "assistant", "content": row["answer"].strip()},
            ]
        }
        for row in arithmetic_rows(count, seed)
    ]


# -- reading and checking the rows ----------------------------------------------------------------------------------


def _dataset_records(dataset: str) -> tuple[str, list[tuple[str, object]], Optional[list]]:
    """(name, [(where, record)], columns or None): the data set's records, each with where it is (``file:line`` for
    JSON lines and CSV) for error messages; columns for column-oriented sources (CSV, ``datasets``)."""
    import csv

    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = dataset
    extension = os.path.splitext(path)[1].lower().lstrip(".")
    if extension in ("json", "jsonl") and not os.path.isdir(path):
        return path, read_json_rows(path, "dataset", key="dataset"), None
    if extension == "csv" and not os.path.isdir(path):
        reader = None
        try:
            with open(path, newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                records = [(f"{path}:{reader.line_num}", row) for row in reader]
                return path, records, list(reader.fieldnames or [])
        except FileNotFoundError:
            raise RecipeError(
                f"dataset: no such file {path}; fix: set dataset to an existing .json, .jsonl or .csv "
                "file, a datasets name or builtin:arithmetic",
                key="dataset",
            ) from None
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            line = f":{reader.line_num}" if reader is not None else ""
            raise RecipeError(
                f"{path}{line}: not readable as CSV ({one_line(error)}); fix: a UTF-8 CSV file with a header row"
            ) from None
    if not os.path.exists(path):
        try:
            validate_repo_id(path)
        except HFValidationError:
            raise RecipeError(
                f"dataset: no such file or folder {path!r}, and it is no Hub dataset name either; fix: "
                "set dataset to an existing .json, .jsonl or .csv file, a datasets name or "
                "builtin:arithmetic",
                key="dataset",
            ) from None
    from datasets import load_dataset

    try:
        if os.path.isfile(path):
            data = load_dataset({"txt": "text", "jsonl": "json"}.get(extension, extension), data_files=path)["train"]
        else:
            data = load_dataset(path)["train"]
    except Exception as error:  # noqa: BLE001  (datasets raises many kinds; each becomes one line naming the source)
        raise RecipeError(
            f"dataset {path!r}: datasets.load_dataset failed ({type(error).__name__}: "
            f"{one_line(error)}); fix: set dataset to a local .json, .jsonl or .csv file, a data set "
            "with a 'train' split, or builtin:arithmetic",
            key="dataset",
        ) from None
    return path, [(f"{path} row {index + 1}", row) for index, row in enumerate(data)], list(data.column_names)


def _size_fix(rows: int, eval_size: int) -> str:
    if rows >= 2:
        eval_size = min(eval_size, max(1, rows // 5))
        return f"lower them (e.g. --eval_size {eval_size} --train_size {rows - eval_size}) or add rows"
    return "add rows: the recipe needs at least one training and one held-out example"


def _prompt_answer_row(where: str, record: dict, recipe) -> dict:
    row = {}
    for role, field_name, key in (
        ("prompt", recipe.prompt_field, "prompt_field"),
        ("answer", recipe.answer_field, "answer_field"),
    ):
        value = record.get(field_name)
        if not isinstance(value, str) or not value.strip():
            what = (
                "has no"
                if field_name not in record
                else (
                    "has an empty"
                    if isinstance(value, str) or value is None
                    else f"has {value!r} ({type(value).__name__}), not text, in its"
                )
            )
            raise RecipeError(
                f"{where}: the row {what} {field_name!r} field ({key}); fix: give every row a "
                f'non-empty text {role} (quote numbers, e.g. " 42") or remove the row'
            )
        row[role] = value
    return row


def _chat_row(where: str, record: dict, field_name: str) -> dict:
    messages = record.get(field_name)
    fix = (
        f'fix: make {field_name!r} a list of {{"role": ..., "content": ...}} with at least one assistant turn, '
        "or remove the row"
    )
    if not isinstance(messages, list) or not messages:
        kind = "empty" if messages in ([], None) else type(messages).__name__
        raise RecipeError(
            f"{where}: the row's {field_name!r} field (messages_field) is {kind}, not a conversation; {fix}"
        )
    for index, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise RecipeError(
                f"{where}: message {index} of {field_name!r} is {one_line(repr(message))[:80]}, not a "
                f"{{role, content}} pair with role one of {list(ROLES)} and text content; {fix}"
            )
    if not any(message["role"] == "assistant" for message in messages):
        raise RecipeError(
            f"{where}: the conversation in {field_name!r} has no assistant turn, so nothing to learn; {fix}"
        )
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}


def load_rows(recipe) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows, checked before anything trains: ``{"prompt", "answer"}`` rows, or ``{"messages"}`` rows
    for chat data (a data set with a ``messages_field`` column and no prompt/answer columns). The first
    ``eval_size`` rows are held out, the next ``train_size`` train. A missing or malformed file, a missing or
    malformed field, or fewer rows than ``train_size + eval_size`` is a :class:`RecipeError` naming the file (and
    line) and the fix."""
    if recipe.dataset.startswith("builtin:"):
        if recipe.dataset not in BUILTIN:
            raise RecipeError(
                f"dataset {recipe.dataset!r} is no built-in data set; fix: set dataset to one of "
                f"{list(BUILTIN)}, a local .json/.jsonl/.csv file or a datasets name",
                key="dataset",
            )
        make = arithmetic_rows if recipe.dataset == "builtin:arithmetic" else arithmetic_chat_rows
        return make(recipe.train_size, recipe.seed), make(recipe.eval_size, recipe.seed + 1)
    name, records, columns = _dataset_records(recipe.dataset)
    if not records:
        raise RecipeError(
            f"dataset {name} holds no rows; fix: add rows with the fields {recipe.prompt_field!r} "
            f"(prompt_field) and {recipe.answer_field!r} (answer_field), or {recipe.messages_field!r} "
            "(messages_field), or set dataset to another file"
        )
    if columns is None:  # JSON: a column is a field some record has
        columns = sorted({k for _, record in records if isinstance(record, dict) for k in record})
    missing = [f for f in (recipe.prompt_field, recipe.answer_field) if f not in columns]
    chat = bool(missing) and recipe.messages_field in columns
    if missing and not chat:
        raise RecipeError(
            f"dataset {name} has no column(s) {missing}; its columns are {columns}; fix: set "
            "prompt_field / answer_field to the columns that hold the prompts and answers, or "
            "messages_field to the column that holds conversations"
        )
    rows = []
    for where, record in records:
        if not isinstance(record, dict):
            wanted = (
                f"the field {recipe.messages_field!r}"
                if chat
                else f"the fields {recipe.prompt_field!r} and {recipe.answer_field!r}"
            )
            raise RecipeError(
                f"{where}: a row must be a JSON object with {wanted}, got a {type(record).__name__}; fix that row"
            )
        rows.append(
            _chat_row(where, record, recipe.messages_field) if chat else _prompt_answer_row(where, record, recipe)
        )
    needed = recipe.train_size + recipe.eval_size
    if len(rows) < needed:
        count = f"{len(rows)} row{'' if len(rows) == 1 else 's'}"
        raise RecipeError(
            f"dataset {name} has {count}, fewer than train_size + eval_size = {recipe.train_size} + "
            f"{recipe.eval_size} = {needed}; fix: {_size_fix(len(rows), recipe.eval_size)}"
        )
    return rows[recipe.eval_size : needed], rows[: recipe.eval_size]


# -- tokenising (datasets.Dataset.map) and batching (DataCollatorForSeq2Seq) ----------------------------------------


def _tokenize_prompt_answer(example: dict, tokenizer, max_length: int) -> dict:
    """input_ids of prompt + answer + eos, with labels only on the answer (the prompt is masked with -100);
    ``answer_length`` counts the answer's tokens without the eos; ``full_length`` the tokens before truncation."""
    prompt = tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]
    answer = tokenizer(example["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = prompt + answer
    return {
        "input_ids": ids[:max_length],
        "labels": ([-100] * len(prompt) + answer)[:max_length],
        "answer_length": max(0, min(len(answer) - 1, max_length - len(prompt))),
        "full_length": len(ids),
    }


def chat_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """The conversation as the chat template renders it, cut into (text, trained) pieces: each assistant turn's
    text (from after the template's generation prompt to the end of the turn) is trained, the rest is not. Cut by
    rendering the conversation turn by turn; a template whose renderings are not prefixes of each other is a
    :class:`RecipeError`."""
    segments, done = [], ""
    for index, message in enumerate(messages):
        ends = []
        if message["role"] == "assistant":
            ends.append(
                (
                    tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
                    if index
                    else "",
                    False,
                )
            )
        ends.append(
            (tokenizer.apply_chat_template(messages[: index + 1], tokenize=False), message["role"] == "assistant")
        )
        for text, trained in ends:
            if not text.startswith(done):
                raise RecipeError(
                    "model: the tokenizer's chat template does not render a conversation turn by turn "
                    "(a shorter conversation's text is no prefix of the longer one's), so the assistant "
                    "turns cannot be located; fix: use prompt/answer columns, or a model whose chat "
                    "template renders turns in order",
                    key="model",
                )
            segments.append((text[len(done) :], trained))
            done = text
    return [(text, trained) for text, trained in segments if text]


def _tokenize_chat(example: dict, tokenizer, max_length: int) -> dict:
    """input_ids of the rendered conversation, labels on the assistant turns only; ``answer_length`` counts the
    trained tokens kept by ``max_length`` (exact match asks for all of them)."""
    ids, labels = [], []
    for text, trained in chat_segments(example["messages"], tokenizer):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [-100] * len(piece)
    kept = labels[:max_length]
    return {
        "input_ids": ids[:max_length],
        "labels": kept,
        "answer_length": sum(t != -100 for t in kept),
        "full_length": len(ids),
    }


def tokenize(rows, tokenizer, max_length: int):
    """A ``datasets.Dataset`` of input_ids, labels (-100 off the answer), answer_length and full_length, made with
    ``Dataset.map`` from ``rows`` (a list of prompt/answer or chat rows, or a Dataset of them)."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    data = rows if isinstance(rows, Dataset) else Dataset.from_list(list(rows))
    chat = "messages" in data.column_names
    if chat and not getattr(tokenizer, "chat_template", None):
        raise RecipeError(
            "model: the data is chat-formatted (a messages column) but the model's tokenizer has no "
            "chat template; fix: use prompt/answer columns, or a model whose tokenizer has one",
            key="model",
        )
    return data.map(
        _tokenize_chat if chat else _tokenize_prompt_answer,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
        remove_columns=data.column_names,
    )


MODEL_INPUTS = ("input_ids", "labels")  # what the collator batches (attention_mask is made by padding)


def collate(tokenizer):
    """transformers' ``DataCollatorForSeq2Seq``: right-padded input_ids and attention_mask, labels padded with
    -100, from examples of :func:`tokenize` (extra columns are dropped)."""
    from transformers import DataCollatorForSeq2Seq

    pad = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding="longest", return_tensors="pt")

    def collator(examples):
        return dict(pad([{key: example[key] for key in MODEL_INPUTS} for example in examples]))

    return collator


def check_answers_fit(max_length: int, split: str, examples) -> None:
    """Stop (held-out rows) or warn (training rows) when ``max_length`` leaves an example no answer token: a
    held-out one would count as a miss whatever the model answers, a training one teaches nothing."""
    lengths, full = examples["answer_length"], examples["full_length"]
    cut = [length for answer, length in zip(lengths, full) if answer == 0]
    if not cut:
        return
    need = max(cut)
    message = (
        f"max_length {max_length} leaves {len(cut)} of {len(lengths)} {split} examples no answer token "
        f"(the longest of them needs {need} tokens); fix: set max_length to at least {need} or shorten the "
        "prompts"
    )
    if split == "held-out" or len(cut) == len(lengths):
        raise RecipeError(message, key="max_length")
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: {message}", file=sys.stderr)


def prepare_data(recipe, tokenizer, train_rows: list[dict], eval_rows: list[dict]):
    """(train set, held-out set), tokenised (``Dataset.map``): loss on the answer, or on the assistant turns."""
    with located(recipe):
        train_set = tokenize(train_rows, tokenizer, recipe.max_length)
        eval_set = tokenize(eval_rows, tokenizer, recipe.max_length)
        check_answers_fit(recipe.max_length, "held-out", eval_set)
        check_answers_fit(recipe.max_length, "training", train_set)
    return train_set, eval_set
