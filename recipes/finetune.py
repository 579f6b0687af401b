"""Fine-tune a causal LM with any of our methods (or LoRA) through transformers' Trainer and accelerate.

    python recipes/finetune.py                                   # the default: SmolLM2-135M, PiSSA, CPU, minutes
    accelerate launch recipes/finetune.py --config recipes/configs/pissa.yaml [--max_steps 200 ...]

The YAML (recipes/configs/*.yaml) names the model, the data, the method and its config, the quantisation and the
training arguments; ``--key value`` flags override it. Before and after training the recipe prints the held-out
loss and the exact-match rate of greedy answers. The output folder gets the adapter (safetensors), checkpoints
(``--resume true`` continues from the last complete one), ``loss.png`` and ``metrics.json``; ``--push_to_hub
user/repo`` pushes the adapter with a model card (method, ranks, trainable parameters, training summary, loading
code).

Bad input (the YAML, a flag, the data file, the checkpoint to resume, the Hub repo id) stops the recipe before any
model is loaded with one line, ``error: <file:line or flag>: <key> ... fix: ...``, and exit status 2; ``run()``
called from Python raises it as :class:`common.RecipeError` (a ValueError).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

from common import (RecipeError, as_float, check_field_types, check_finite_numbers, check_number, check_output_dir,
                    check_positive_int, check_pretrained_source, check_repo_id, load_recipe, located, one_line,
                    read_json_rows)

METHODS = ("lora", "pissa", "svfit", "flora", "effort")
QUANTIZATIONS = ("none", "8bit", "4bit")
DTYPES = ("float32", "bfloat16", "float16")
TRAINING_DEFAULTS = dict(
    max_steps=120, per_device_train_batch_size=8, per_device_eval_batch_size=16, learning_rate=2e-4,
    logging_steps=10, save_steps=40, save_total_limit=2, lr_scheduler_type="constant", report_to=[],
    seed=0, data_seed=0, disable_tqdm=False,
)


@dataclass
class FinetuneRecipe:
    model: str = "smollm2"  # "smollm2" (packaged SmolLM2-135M-Instruct) or a local folder (safetensors)
    dataset: str = "builtin:arithmetic"  # builtin:arithmetic, a datasets name, or a local .json/.jsonl/.csv file
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    train_size: int = 2000
    eval_size: int = 64
    max_length: int = 64
    method: str = "pissa"
    method_config: dict = field(default_factory=lambda: {"r": 8, "lora_alpha": 8, "target_modules": "all-linear",
                                                          "init": "randomized", "niter": 4})
    quantization: str = "none"
    dtype: str = "float32"  # the model's dtype; a 4-bit base is stored in it too (what FSDP shards)
    training: dict = field(default_factory=dict)
    output_dir: str = "runs/finetune"
    resume: bool = False
    push_to_hub: Optional[str] = None  # a repo id: the adapter and a model card are pushed after training
    seed: int = 0

    def __post_init__(self):
        """Types and ranges of every key, checked without touching any file, model or network: a
        :class:`RecipeError` naming the key and the fix (``load_recipe`` adds the file and line)."""
        check_field_types(self)
        for key, allowed in (("method", METHODS), ("dtype", DTYPES), ("quantization", QUANTIZATIONS)):
            if getattr(self, key) not in allowed:
                raise RecipeError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}; fix: set {key} to "
                                  "one of them", key=key)
        if self.quantization != "none" and self.method not in ("lora", "pissa"):
            raise RecipeError(
                f"quantization={self.quantization!r} needs a method that trains on a quantised base: 'lora' (QLoRA) "
                f"or 'pissa' (QPiSSA). {self.method} takes its SVD or its update from the full-precision weights; "
                "fix: set quantization: none", key="quantization"
            )
        for key in ("model", "dataset", "prompt_field", "answer_field", "output_dir"):
            if not getattr(self, key).strip():
                raise RecipeError(f"{key} is empty; fix: set {key} (see recipes/configs/lora.yaml)", key=key)
        check_positive_int("train_size", self.train_size, "the number of training examples")
        check_positive_int("eval_size", self.eval_size, "the number of held-out examples the metrics are computed on")
        check_positive_int("max_length", self.max_length, "tokens per example, prompt and answer together")
        check_finite_numbers("method_config", self.method_config)
        check_finite_numbers("training", self.training)
        check_repo_id("push_to_hub", self.push_to_hub)


def peft_config(recipe: FinetuneRecipe):
    """The method's config from ``method_config``; a key the config does not have, or a value it rejects, is a
    :class:`RecipeError` naming it."""
    import dataclasses

    from peft import LoraConfig, TaskType

    import subspace_peft

    classes = {"lora": LoraConfig, "pissa": subspace_peft.PiSSAConfig, "svfit": subspace_peft.SVFitConfig,
               "flora": subspace_peft.FLoRAConfig, "effort": subspace_peft.EffortConfig}
    config_class = classes[recipe.method]
    config_fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(recipe.method_config) - set(config_fields))
    if unknown and recipe.method_config == FinetuneRecipe().method_config:
        raise RecipeError(f"method_config is not set, and the default one is PiSSA's ({unknown} are no "
                          f"{config_class.__name__} fields); fix: set method_config for {recipe.method} (see "
                          f"recipes/configs/{recipe.method}.yaml)", key="method")
    if unknown:
        import difflib

        hints = [m[0] for k in unknown for m in [difflib.get_close_matches(str(k), list(config_fields), n=1)] if m]
        raise RecipeError(f"method_config: {config_class.__name__} has no field(s) {unknown}"
                          f"{f' (did you mean {hints}?)' if hints else ''}; fix: use the fields its docstring lists",
                          key=f"method_config.{unknown[0]}")
    values = dict(recipe.method_config)
    for key, value in values.items():  # PyYAML reads 1e-3 (no dot) as a string
        if isinstance(config_fields[key].default, float) and isinstance(value, str) and as_float(value) is not None:
            values[key] = as_float(value)
    if recipe.method == "pissa" and recipe.quantization != "none":
        values["residual_quantization"] = "nf4" if recipe.quantization == "4bit" else "int8"
        if recipe.quantization == "4bit":  # stored in the dtype FSDP shards in, as for QLoRA below
            values.setdefault("residual_quant_storage", recipe.dtype)
    try:
        return config_class(task_type=TaskType.CAUSAL_LM, **values)
    except (ValueError, TypeError) as error:
        raise RecipeError(f"method_config: {config_class.__name__} rejects it: {one_line(error)}; fix: correct the "
                          "value it names", key="method_config") from None


def _dataset_records(recipe: FinetuneRecipe) -> tuple[str, list[tuple[str, object]], Optional[list]]:
    """(name, [(where, record)], columns or None): the data set's records, each with where it is (``file:line`` for
    JSON lines and CSV) for error messages; columns for column-oriented sources (CSV, ``datasets``)."""
    import csv

    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = recipe.dataset
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
            raise RecipeError(f"dataset: no such file {path}; fix: set dataset to an existing .json, .jsonl or .csv "
                              "file, a datasets name or builtin:arithmetic", key="dataset") from None
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            line = f":{reader.line_num}" if reader is not None else ""
            raise RecipeError(f"{path}{line}: not readable as CSV ({one_line(error)}); fix: a UTF-8 CSV file with a "
                              "header row") from None
    if not os.path.exists(path):
        try:
            validate_repo_id(path)
        except HFValidationError:
            raise RecipeError(f"dataset: no such file or folder {path!r}, and it is no Hub dataset name either; fix: "
                              "set dataset to an existing .json, .jsonl or .csv file, a datasets name or "
                              "builtin:arithmetic", key="dataset") from None
    from datasets import load_dataset

    try:
        if os.path.isfile(path):
            data = load_dataset({"txt": "text", "jsonl": "json"}.get(extension, extension), data_files=path)["train"]
        else:
            data = load_dataset(path)["train"]
    except Exception as error:  # noqa: BLE001  (datasets raises many kinds; each becomes one line naming the source)
        raise RecipeError(f"dataset {path!r}: datasets.load_dataset failed ({type(error).__name__}: "
                          f"{one_line(error)}); fix: set dataset to a local .json, .jsonl or .csv file, a data set "
                          "with a 'train' split, or builtin:arithmetic", key="dataset") from None
    return path, [(f"{path} row {index + 1}", row) for index, row in enumerate(data)], list(data.column_names)


def _size_fix(rows: int, recipe: FinetuneRecipe) -> str:
    if rows >= 2:
        eval_size = min(recipe.eval_size, max(1, rows // 5))
        return f"lower them (e.g. --eval_size {eval_size} --train_size {rows - eval_size}) or add rows"
    return "add rows: the recipe needs at least one training and one held-out example"


def load_rows(recipe: FinetuneRecipe) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows with the prompt and answer fields, checked before anything trains: the first
    ``eval_size`` rows are held out, the next ``train_size`` train. A missing or malformed file, a missing or
    non-text prompt/answer field, or fewer rows than ``train_size + eval_size`` is a :class:`RecipeError` naming the
    file (and line) and the fix."""
    from data import arithmetic_rows

    if recipe.dataset.startswith("builtin:"):
        if recipe.dataset != "builtin:arithmetic":
            raise RecipeError(f"dataset {recipe.dataset!r} is no built-in data set; fix: set dataset to "
                              "builtin:arithmetic, a local .json/.jsonl/.csv file or a datasets name", key="dataset")
        return arithmetic_rows(recipe.train_size, recipe.seed), arithmetic_rows(recipe.eval_size, recipe.seed + 1)
    name, records, columns = _dataset_records(recipe)
    wanted = (("prompt", recipe.prompt_field, "prompt_field"), ("answer", recipe.answer_field, "answer_field"))
    if not records:
        raise RecipeError(f"dataset {name} holds no rows; fix: add rows with the fields {recipe.prompt_field!r} "
                          f"(prompt_field) and {recipe.answer_field!r} (answer_field), or set dataset to another "
                          "file")
    if columns is None:  # JSON: a column is a field some record has
        columns = sorted({k for _, record in records if isinstance(record, dict) for k in record})
    missing = [field_name for _, field_name, _ in wanted if field_name not in columns]
    if missing:
        raise RecipeError(f"dataset {name} has no column(s) {missing}; its columns are {columns}; fix: set "
                          "prompt_field / answer_field to the columns that hold the prompts and answers")
    rows = []
    for where, record in records:
        if not isinstance(record, dict):
            raise RecipeError(f"{where}: a row must be a JSON object with the fields {recipe.prompt_field!r} and "
                              f"{recipe.answer_field!r}, got a {type(record).__name__}; fix that row")
        row = {}
        for role, field_name, key in wanted:
            value = record.get(field_name)
            if not isinstance(value, str) or not value.strip():
                what = "has no" if field_name not in record else (
                    "has an empty" if isinstance(value, str) or value is None else
                    f"has {value!r} ({type(value).__name__}), not text, in its")
                raise RecipeError(f"{where}: the row {what} {field_name!r} field ({key}); fix: give every row a "
                                  f"non-empty text {role} (quote numbers, e.g. \" 42\") or remove the row")
            row[role] = value
        rows.append(row)
    needed = recipe.train_size + recipe.eval_size
    if len(rows) < needed:
        count = f"{len(rows)} row{'' if len(rows) == 1 else 's'}"
        raise RecipeError(f"dataset {name} has {count}, fewer than train_size + eval_size = {recipe.train_size} + "
                          f"{recipe.eval_size} = {needed}; fix: {_size_fix(len(rows), recipe)}")
    return rows[recipe.eval_size:needed], rows[:recipe.eval_size]


# TrainingArguments keys with a range the recipe checks before anything loads (the rest TrainingArguments checks)
_POSITIVE_TRAINING_INTS = {
    "max_steps": "the number of optimizer steps the recipe trains for; -1 trains for num_train_epochs instead",
    "per_device_train_batch_size": "training examples per device and step",
    "per_device_eval_batch_size": "held-out examples per device and evaluation batch",
    "gradient_accumulation_steps": "batches accumulated per optimizer step",
}
_TRAINING_RANGES = {  # key: (low, high, low_open)
    "learning_rate": (0.0, None, True), "num_train_epochs": (0.0, None, True), "weight_decay": (0.0, None, False),
    "warmup_ratio": (0.0, 1.0, False), "warmup_steps": (0.0, None, False), "max_grad_norm": (0.0, None, False),
    "logging_steps": (0.0, None, True), "save_steps": (0.0, None, True), "eval_steps": (0.0, None, True),
    "adam_beta1": (0.0, 1.0, False), "adam_beta2": (0.0, 1.0, False), "adam_epsilon": (0.0, None, True),
}


def training_arguments(recipe: FinetuneRecipe):
    """transformers' TrainingArguments from the defaults and ``training``; an unknown key, a wrong type or a value
    out of range (learning rate <= 0 or NaN, max_steps or a batch size < 1, ...) is a :class:`RecipeError` keyed
    ``training.<key>``."""
    import dataclasses
    import difflib

    from transformers import TrainingArguments

    known = {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}
    unknown = sorted(str(k) for k in recipe.training if k not in known)
    if unknown:
        hints = [m[0] for k in unknown for m in [difflib.get_close_matches(k, list(known), n=1)] if m]
        raise RecipeError(f"training: unknown key(s) {unknown}{f' (did you mean {hints}?)' if hints else ''}; fix: "
                          "use transformers.TrainingArguments field names", key=f"training.{unknown[0]}")
    # no use_cpu: transformers picks the device itself, and use_cpu=True would turn off DDP's gradient all-reduce
    # in a CPU run under accelerate launch
    values = {**TRAINING_DEFAULTS, "output_dir": recipe.output_dir, "eval_strategy": "steps", **recipe.training}
    values.setdefault("eval_steps", values["save_steps"])
    for key, value in list(values.items()):  # PyYAML reads 1e-4 (no dot) as a string
        if key in known and isinstance(known[key].default, float) and isinstance(value, str):
            values[key] = as_float(value) if as_float(value) is not None else value
    for key, what in _POSITIVE_TRAINING_INTS.items():
        if key == "max_steps" and values.get(key) == -1 and not isinstance(values[key], bool):
            continue  # transformers' own meaning: train for num_train_epochs
        check_positive_int(f"training.{key}", values[key] if key in values else 1, what)
    for key, (low, high, low_open) in _TRAINING_RANGES.items():
        if values.get(key) is not None:
            check_number(f"training.{key}", values[key], low, high, low_open=low_open)
    limit = values.get("save_total_limit")
    if limit is not None:
        check_positive_int("training.save_total_limit", limit, "checkpoints kept; null keeps all")
    try:
        return TrainingArguments(**values)
    except (TypeError, ValueError) as error:
        raise RecipeError(f"training: TrainingArguments rejects it: {one_line(error)}; fix: correct the key it "
                          "names", key="training") from None


def tokenize(rows: list[dict], tokenizer, max_length: int) -> list[dict]:
    """input_ids of prompt + answer + eos, with labels only on the answer (the prompt is masked with -100);
    ``answer_length`` counts the answer's tokens without the eos."""
    examples = []
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        answer = tokenizer(row["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + answer)[:max_length]
        examples.append({"input_ids": ids, "labels": ([-100] * len(prompt) + answer)[:max_length],
                         "answer_length": max(0, min(len(answer) - 1, max_length - len(prompt)))})
    return examples


def collate(pad_id: int):
    import torch

    def pad(examples):
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), pad_id)
        labels = torch.full((len(examples), width), -100)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
            labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
            mask[i, : len(e["input_ids"])] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return pad


def answer_metrics(model, examples: list[dict], collator, batch_size: int = 16) -> dict:
    """``eval_loss``: mean loss per answer token over ``examples`` (from :func:`tokenize`); ``exact_match``: share of
    examples whose greedy continuation starts with the answer. One forward pass per batch gives both (the same on
    every process).

    Exact match is teacher-forced: greedy decoding produces the answer exactly when each answer token is the argmax
    given the prompt and the answer tokens before it, which is what is checked (ties aside).
    """
    import torch

    model.eval()
    total = count = 0.0
    hits = 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
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


_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "pytorch_model.bin.index.json")


def _file_problem(path: str) -> Optional[str]:
    """Why the checkpoint file at ``path`` cannot be loaded, or None; read without unpickling anything: JSON parses,
    a safetensors header parses and covers the file, a torch file is a zip archive whose members pass their CRC."""
    import zipfile

    if os.path.getsize(path) == 0:
        return "is empty"
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as handle:
                json.load(handle)
        except json.JSONDecodeError as error:
            return f"is not valid JSON (line {error.lineno}: {error.msg}): truncated?"
        except (OSError, ValueError) as error:
            return f"cannot be read ({one_line(error)})"
    elif path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="numpy") as handle:
                list(handle.keys())
        except Exception as error:  # noqa: BLE001  (SafetensorError derives from Exception only)
            return f"is truncated or corrupt ({one_line(error)})"
    elif path.endswith((".pt", ".pth", ".bin")):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
            return f"is truncated or corrupt (not a readable torch zip archive: {one_line(error)})"
        if bad is not None:
            return f"is corrupt (its member {bad} fails its CRC check)"
    return None


def checkpoint_problem(path: str, save_only_model: bool = False) -> Optional[str]:
    """Why Trainer could not resume exactly from the ``checkpoint-N`` folder ``path``, or None if it can.

    Complete means: ``trainer_state.json`` (which Trainer writes last) is there, every file in the folder is
    loadable (:func:`_file_problem`), and the model weights, the optimizer and scheduler states and an RNG state are
    all there (Trainer would otherwise resume with a fresh optimizer without a word). DeepSpeed keeps model and
    optimizer in its ``global_step*`` folder; ``save_only_model`` checkpoints hold only the weights."""
    names = set(os.listdir(path))
    if "trainer_state.json" not in names:
        return "trainer_state.json is missing: the save did not finish"
    for root, subfolders, files in os.walk(path):
        subfolders.sort()
        for name in sorted(files):
            problem = _file_problem(os.path.join(root, name))
            if problem:
                return f"{os.path.relpath(os.path.join(root, name), path)} {problem}"
    folders = {n for n in names if os.path.isdir(os.path.join(path, n))}
    deepspeed = any(n.startswith("global_step") for n in folders)
    if not (deepspeed or names.intersection(_WEIGHT_FILES) or any(n.startswith("pytorch_model_fsdp") for n in names)):
        return "adapter_model.safetensors is missing (no model weights)"
    if save_only_model:
        return None
    if not deepspeed:
        if not ({"optimizer.pt", "optimizer.bin"} & names or any(n.startswith("optimizer") for n in folders)):
            return "optimizer.pt is missing"
        if "scheduler.pt" not in names:
            return "scheduler.pt is missing"
    if not any(re.fullmatch(r"rng_state(_\d+)?\.pth", n) for n in names):
        return "rng_state.pth is missing"
    return None


def last_complete_checkpoint(output_dir: str, save_only_model: bool = False) -> str:
    """The newest ``checkpoint-N`` in ``output_dir`` that :func:`checkpoint_problem` finds complete. A run killed
    while saving (or a file truncated since) leaves a newer, incomplete folder: it is skipped with one line on stderr
    saying why and which checkpoint is used instead. No complete checkpoint is a :class:`RecipeError`."""
    fix = "fix: set resume: false to start a new run, or output_dir to the run to continue"
    if not os.path.isdir(output_dir):
        raise RecipeError(f"resume: {output_dir} does not exist, so there is no checkpoint to resume from; {fix}",
                          key="resume")
    steps = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            steps.append((int(match.group(1)), os.path.join(output_dir, name)))
    if not steps:
        raise RecipeError(f"resume: {output_dir} holds no checkpoint-N folder to resume from; {fix}", key="resume")
    skipped = []
    for _, path in sorted(steps, reverse=True):
        problem = checkpoint_problem(path, save_only_model)
        if problem is None:
            if skipped and int(os.environ.get("RANK", "0")) == 0:
                print(f"resume: skipping incomplete checkpoint {'; '.join(skipped)}; resuming from {path}",
                      file=sys.stderr)
            return path
        skipped.append(f"{path} ({problem})")
    raise RecipeError(f"resume: no complete checkpoint in {output_dir}: {'; '.join(skipped)}; {fix}", key="resume")


def save_loss_curve(log_history: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in log_history if "loss" in e]
    losses = [e["loss"] for e in log_history if "loss" in e]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(steps, losses, label="train")
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    if evals:
        axis.plot(*zip(*evals), "o-", label="eval")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def load_model_kwargs(recipe: FinetuneRecipe) -> dict:
    """from_pretrained's keyword arguments: the dtype, and for QLoRA the bitsandbytes config."""
    import torch
    from transformers import BitsAndBytesConfig

    dtype = getattr(torch, recipe.dtype)
    kwargs = dict(dtype=dtype, use_safetensors=True)
    if recipe.quantization != "none" and recipe.method == "lora":  # QLoRA: quantise the base on load
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=recipe.quantization == "4bit", load_in_8bit=recipe.quantization == "8bit",
            bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            # 4-bit data stored in the model's dtype: FSDP shards and all-gathers it with the other parameters (and
            # casts nothing when mixed precision uses that dtype); a single process computes the same
            bnb_4bit_quant_storage=dtype,
        )
    return kwargs


def model_path(recipe: FinetuneRecipe) -> str:
    from packaged_models import smollm2_path

    return smollm2_path() if recipe.model == "smollm2" else recipe.model


def check_model_source(recipe: FinetuneRecipe) -> None:
    """``model`` names the packaged model, a local model folder whose config.json parses, or a Hub model id;
    else a :class:`RecipeError` (nothing is loaded)."""
    if recipe.model == "smollm2":
        from packaged_models import smollm2_missing

        missing = smollm2_missing()
        if missing:
            raise RecipeError(f"model: smollm2 (the packaged SmolLM2-135M-Instruct) is not installed; fix: {missing}, "
                              "or set model to a local model folder or a Hub model id", key="model")
    else:
        check_pretrained_source("model", recipe.model, "config.json", "fix: set model to smollm2, a local model "
                                "folder (config.json and safetensors) or a Hub model id")


def load_tokenizer(recipe: FinetuneRecipe):
    """The model's tokenizer, with an eos and a pad token; a model it cannot be loaded from is a RecipeError."""
    from transformers import AutoTokenizer

    path = model_path(recipe)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise RecipeError(f"model: no tokenizer could be loaded from {path!r} ({type(error).__name__}: "
                          f"{one_line(error)}); fix: set model to smollm2, a local model folder with its tokenizer or "
                          "a Hub model id", key="model") from None
    if tokenizer.eos_token_id is None:  # e.g. a BERT-style tokenizer: its separator ends an answer
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(recipe: FinetuneRecipe, tokenizer=None):
    """(model, tokenizer) of ``recipe.model`` (the tokenizer is loaded unless given)."""
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(recipe)
    return AutoModelForCausalLM.from_pretrained(model_path(recipe), **load_model_kwargs(recipe)), tokenizer


def keep_4bit_layers_on_the_training_path(model) -> None:
    """Stop bitsandbytes' CPU inference path for 4-bit layers, which evaluation would otherwise take.

    bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks a Linear4bit's weight on its first no-grad evaluation
    forward, rounding the block scales to bf16, and ``state_dict()`` (every checkpoint save) unpacks it again without
    restoring them. Measured: the same model's logits moved by 0.02 after a save, and under DDP the rank that saved
    evaluated differently from the others. Kept on the training path, evaluation computes what training does.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def fsdp_storage_mismatch(recipe: FinetuneRecipe, mixed_precision: str) -> Optional[str]:
    """Why FSDP with this mixed precision would corrupt the recipe's 4-bit base, or None.

    FSDP casts every floating parameter to the mixed-precision dtype before gathering it, the 4-bit data stored as
    floats included: the packed bytes are converted as if they were numbers. Measured (FSDP2 on CPU): float32
    storage under bf16 mixed precision fails inside bitsandbytes with a shape error; bfloat16 storage works.
    """
    wanted = {"bf16": "bfloat16", "fp16": "float16"}.get(mixed_precision)
    if recipe.quantization != "4bit" or wanted is None or wanted == recipe.dtype:
        return None
    return (f"FSDP with mixed_precision {mixed_precision} would cast the 4-bit base, stored as {recipe.dtype}, to "
            f"{wanted} and corrupt it: pass --dtype {wanted}")


def check_distribution_took_effect(trainer, recipe: FinetuneRecipe) -> None:
    """Stop a run whose distribution accelerate quietly changed.

    accelerate 1.x falls back to no distribution when a config asks for FSDP without GPUs (each process then trains
    its own copy) and to DDP when ACCELERATE_USE_CPU=true (measured with recipes/accelerate/fsdp.yaml).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    asked = [kind for kind in ("FSDP", "DEEPSPEED") if os.environ.get(f"ACCELERATE_USE_{kind}", "").lower() == "true"]
    got = str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1]
    mismatch = trainer.is_fsdp_enabled and fsdp_storage_mismatch(recipe, str(trainer.accelerator.mixed_precision))
    if mismatch:
        raise RecipeError(mismatch)
    if trainer.is_fsdp_enabled and not trainer.accelerator.is_fsdp2:
        # FSDP1 inserts wrapper modules, and peft then finds no adapter under their names: it saves an empty adapter
        raise RecipeError("accelerate config: FSDP1 is not supported; fix: set fsdp_version: 2 "
                          "(recipes/accelerate/fsdp.yaml)")
    if (world_size > 1 and trainer.accelerator.num_processes != world_size) or (asked and asked[0] != got):
        raise RecipeError(
            f"the launch asked for {asked[0] if asked else 'distribution'} over {world_size} "
            f"process(es) but accelerate set up {got} with {trainer.accelerator.num_processes}. FSDP and DeepSpeed "
            "need GPUs; fix: on CPU use DDP: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N "
            "recipes/finetune.py"
        )


class CheckedInputs(NamedTuple):
    config: object  # the method's peft config
    rows: tuple  # (train rows, eval rows)
    args: object  # TrainingArguments
    resume_from: Optional[str]  # the checkpoint to resume from (None: a new run)


def checked_inputs(recipe: FinetuneRecipe) -> CheckedInputs:
    """Every check of the recipe's input, done before any model is loaded or anything is written: the method
    config, the model source, the data, the training arguments, the checkpoint to resume from. A problem is a
    :class:`RecipeError` naming the file and line (or flag) of the key at fault."""
    with located(recipe):  # the checks that need no heavy import first: their errors come in a fraction of a second
        check_model_source(recipe)
        check_output_dir("output_dir", recipe.output_dir)
        rows = load_rows(recipe)
        save_only_model = bool(recipe.training.get("save_only_model", False))
        resume_from = last_complete_checkpoint(recipe.output_dir, save_only_model) if recipe.resume else None
        config = peft_config(recipe)
        args = training_arguments(recipe)
    return CheckedInputs(config, rows, args, resume_from)


def check_answers_fit(recipe: FinetuneRecipe, tokenizer, split: str, rows: list[dict], examples: list[dict]) -> None:
    """Stop (held-out rows) or warn (training rows) when ``max_length`` leaves an example no answer token: a
    held-out one would count as a miss whatever the model answers, a training one teaches nothing."""
    cut = [row for row, example in zip(rows, examples) if example["answer_length"] == 0]
    if not cut:
        return
    need = max(len(tokenizer(row["prompt"] + row["answer"], add_special_tokens=False)["input_ids"]) + 1 for row in cut)
    message = (f"max_length {recipe.max_length} leaves {len(cut)} of {len(rows)} {split} examples no answer token "
               f"(the longest of them needs {need} tokens); fix: set max_length to at least {need} or shorten the "
               "prompts")
    if split == "held-out" or len(cut) == len(rows):
        raise RecipeError(message, key="max_length")
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: {message}", file=sys.stderr)


def run(recipe: FinetuneRecipe, inputs: Optional[CheckedInputs] = None) -> dict:
    """Train and evaluate; ``inputs`` is :func:`checked_inputs` of ``recipe`` if the caller already has it. Bad
    input raises :class:`RecipeError` (a ValueError) before the model is loaded."""
    from peft import get_peft_model
    from transformers import Trainer

    config, (train_rows, eval_rows), args, resume_from = inputs if inputs is not None else checked_inputs(recipe)
    with located(recipe):
        tokenizer = load_tokenizer(recipe)
        train_set = tokenize(train_rows, tokenizer, recipe.max_length)
        eval_set = tokenize(eval_rows, tokenizer, recipe.max_length)
        check_answers_fit(recipe, tokenizer, "held-out", eval_rows, eval_set)
        check_answers_fit(recipe, tokenizer, "training", train_rows, train_set)
    model, tokenizer = load_model(recipe, tokenizer)
    model = get_peft_model(model, config)
    keep_4bit_layers_on_the_training_path(model)
    model.print_trainable_parameters()
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                      data_collator=collate(tokenizer.pad_token_id))
    check_distribution_took_effect(trainer, recipe)
    # Not trainer.evaluate() before trainer.train(): accelerate then marks the model as prepared for evaluation and a
    # distributed run trains without DDP's gradient all-reduce (transformers 5.x, measured).
    before = answer_metrics(model, trainer.eval_dataset, trainer.data_collator)
    print(f"before: {json.dumps(before)}")
    trainer.train(resume_from_checkpoint=resume_from)
    after = answer_metrics(model, trainer.eval_dataset, trainer.data_collator)
    print(f"after: {json.dumps(after)}")
    metrics = {"before": before, "after": after, "method": recipe.method,
               "trainable_parameters": model.get_nb_trainable_parameters()[0]}
    # under FSDP every rank takes part in gathering the sharded adapter (FSDP2: get_model_state_dict, full)
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped) if trainer.is_fsdp_enabled else None
    if trainer.is_world_process_zero():
        model.save_pretrained(os.path.join(recipe.output_dir, "adapter"), state_dict=state_dict)
        save_loss_curve(trainer.state.log_history, os.path.join(recipe.output_dir, "loss.png"))
        with open(os.path.join(recipe.output_dir, "metrics.json"), "w") as handle:
            json.dump(metrics, handle, indent=2)
        if recipe.push_to_hub:
            import subspace_peft

            summary = {"data": recipe.dataset, "steps": trainer.state.global_step,
                       "learning rate": args.learning_rate, "batch size per device": args.per_device_train_batch_size,
                       "quantization": recipe.quantization,
                       "eval loss before / after": f"{before['eval_loss']:.4f} / {after['eval_loss']:.4f}",
                       "exact match before / after": f"{before['exact_match']:.3f} / {after['exact_match']:.3f}"}
            print(f"pushed: {subspace_peft.push_adapter(model, recipe.push_to_hub, training_summary=summary)}")
    return metrics


def main(argv: Optional[list[str]] = None) -> None:
    """The command line: a bad input is ``error: <one line>`` on stderr and exit status 2 (as argparse's)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a YAML recipe (recipes/configs/*.yaml); without it the defaults run")
    args, overrides = parser.parse_known_args(argv)
    try:
        recipe = load_recipe(FinetuneRecipe, args.config, overrides)
        run(recipe)
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
