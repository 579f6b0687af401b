"""Fine-tune a causal LM with any of our methods (or LoRA) through transformers' Trainer (or TRL's SFTTrainer) and
accelerate.

    python recipes/finetune.py                                   # the default: SmolLM2-135M, PiSSA, CPU, minutes
    accelerate launch recipes/finetune.py --config recipes/configs/pissa.yaml [--max_steps 200 ...]
    python recipes/finetune.py --help                            # every flag: the recipe's and TrainingArguments'

The YAML (recipes/configs/*.yaml) names the model, the data, the method and its config, the quantisation and the
training arguments (its ``training:`` block); a flag (one per recipe field and per ``transformers.TrainingArguments``
field: ``--max_steps 300``, ``--learning_rate 1e-3``, ``--method effort``) overrides its key only, and a mapping
given as a flag (``--method_config '{r: 4}'``) merges key by key into the file's. Before and after training the
recipe prints the held-out loss and the exact-match rate of greedy answers. The output folder gets the adapter
(safetensors), checkpoints (``--resume true`` continues from the last complete one), ``loss.png`` and
``metrics.json``; ``--push_to_hub user/repo`` pushes the adapter with a model card.

Bad input (the YAML, a flag, the data file, the checkpoint to resume, the Hub repo id) stops the recipe before any
model is loaded with one line, ``error: <file:line or flag>: <key> ... fix: ...``, and exit status 2; ``run()``
called from Python raises it as :class:`common.RecipeError` (a ValueError).

The run, top to bottom: :func:`configure` (the command line and the file), :func:`checked_inputs` (every check,
before anything loads), :func:`load_model`, :func:`build_adapter`, :func:`prepare_data`, :func:`train`,
:func:`evaluate`, :func:`save_and_push`.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import subspace_peft  # the method records (and our methods registered with peft)
from subspace_peft.methods import DEFAULT_METHOD

from checkpoints import checkpoint_problem, last_complete_checkpoint  # noqa: F401  (part of the recipe's API)
from common import (
    RecipeError,
    as_float,
    check_field_types,
    check_finite_numbers,
    check_number,
    check_output_dir,
    check_positive_int,  # noqa: F401  (part of the recipe's API)
    check_pretrained_source,
    check_repo_id,
    load_recipe,  # noqa: F401  (part of the recipe's API)
    located,
    one_line,
)
from data import check_answers_fit, collate, load_rows, tokenize
from guards import check_distribution_took_effect, keep_4bit_layers_on_the_training_path, launch_problem  # noqa: F401
from guards import fsdp_storage_mismatch as _fsdp_storage_mismatch
from quantization import Quantization


def records() -> dict:
    """Every method the recipe can train: each record registered so far (ours, peft's LoRA, and any a plugin
    registered with :func:`subspace_peft.registry.register`), by name."""
    return {method.name: method for method in subspace_peft.registry.known_methods()}


RECORDS = {method.name: method for method in subspace_peft.METHODS}  # the package's own: the help texts list them
METHODS = tuple(RECORDS)
QUANTIZATIONS = Quantization.names()
DTYPES = ("float32", "bfloat16", "float16")
TRAINERS = ("transformers", "trl")
TRAINING_DEFAULTS = dict(
    max_steps=120,
    per_device_train_batch_size=8,
    per_device_eval_batch_size=16,
    logging_steps=10,
    save_steps=40,
    save_total_limit=2,
    lr_scheduler_type="constant",
    report_to=[],
    disable_tqdm=False,
)
# TRL's SFTConfig defaults that differ from TrainingArguments' (bf16 on, gradient checkpointing on): the recipe trains
# the same way under either trainer unless told otherwise
TRL_DEFAULTS = dict(bf16=False, gradient_checkpointing=False)


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class FinetuneRecipe:
    """The recipe's fields (each a ``--flag`` and a YAML key); ``training`` holds TrainingArguments' keys."""

    model: str = field(
        default="smollm2",
        metadata=_help(
            "smollm2 (the packaged SmolLM2-135M-Instruct), a local model folder (safetensors) or a Hub model id"
        ),
    )
    dataset: str = field(
        default="builtin:arithmetic",
        metadata=_help(
            "builtin:arithmetic, builtin:arithmetic-chat, a datasets name, or a local .json/.jsonl/.csv file"
        ),
    )
    prompt_field: str = field(default="prompt", metadata=_help("the data's prompt column (prompt/answer data)"))
    answer_field: str = field(
        default="answer",
        metadata=_help("the data's answer column (prompt/answer data; the loss is on the answer only)"),
    )
    messages_field: str = field(
        default="messages",
        metadata=_help(
            "the data's conversation column (chat data: a list of {role, content}, rendered with the tokenizer's chat "
            "template; the loss is on the assistant turns only), used when the prompt/answer columns are absent"
        ),
    )
    train_size: int = field(default=2000, metadata=_help("training examples (after the held-out ones)"))
    eval_size: int = field(default=64, metadata=_help("held-out examples (the data's first rows)"))
    max_length: int = field(default=64, metadata=_help("tokens per example, prompt and answer together"))
    method: str = field(default=DEFAULT_METHOD.name, metadata=_help(f"the adapter: one of {', '.join(METHODS)}"))
    method_config: dict = field(
        default_factory=lambda: dict(DEFAULT_METHOD.recipe_defaults),
        metadata=_help(
            "the method's config fields as a mapping ({r: 8, target_modules: all-linear}); a flag merges into the "
            "file's key by key"
        ),
    )
    quantization: str = field(
        default="none",
        metadata=_help(f"one of {', '.join(QUANTIZATIONS)}: QLoRA (method lora) or QPiSSA (method pissa)"),
    )
    dtype: str = field(
        default="float32",
        metadata=_help(
            f"the model's dtype, one of {', '.join(DTYPES)}; a 4-bit base is stored in it too (what FSDP shards)"
        ),
    )
    trainer: str = field(
        default="transformers",
        metadata=_help(
            "transformers (transformers.Trainer) or trl (TRL's SFTTrainer; its SFTConfig keys are allowed in training:)"
        ),
    )
    training: dict = field(
        default_factory=dict,
        metadata=_help(
            "TrainingArguments keys as a mapping (the file's training: block); each is also a flag of its own"
        ),
    )
    output_dir: str = field(
        default="runs/finetune", metadata=_help("the run's folder: adapter/, checkpoint-N/, loss.png, metrics.json")
    )
    resume: bool = field(default=False, metadata=_help("continue from the last complete checkpoint in output_dir"))
    push_to_hub: Optional[str] = field(
        default=None,
        metadata=_help("a Hub repo id (user/name): the adapter and a model card are pushed after training"),
    )
    hub_base_model: Optional[str] = field(
        default=None,
        metadata=_help(
            "the Hub id of the base model, written to the model card and the pushed adapter_config.json; default: "
            "HuggingFaceTB/SmolLM2-135M-Instruct for model smollm2, the model itself for a Hub id; needed for a local "
            "model folder"
        ),
    )
    hub_license: Optional[str] = field(default=None, metadata=_help("the model card's license (e.g. apache-2.0)"))
    hub_datasets: Optional[list[str]] = field(
        default=None, metadata=_help("the model card's datasets (Hub dataset ids)")
    )
    seed: int = field(
        default=0,
        metadata=_help(
            "the data's and the training's seed (TrainingArguments seed and data_seed unless training: sets them)"
        ),
    )

    def __post_init__(self):
        """Types and ranges of every key, checked without touching any file, model or network: a
        :class:`RecipeError` naming the key and the fix (``load_recipe`` adds the file and line)."""
        check_field_types(self)
        for key, allowed in (
            ("method", tuple(records())),
            ("dtype", DTYPES),
            ("quantization", QUANTIZATIONS),
            ("trainer", TRAINERS),
        ):
            if getattr(self, key) not in allowed:
                raise RecipeError(
                    f"{key} must be one of {allowed}, got {getattr(self, key)!r}; fix: set {key} to one of them",
                    key=key,
                )
        if self.quantization != Quantization.NONE.value and self.record.quantized_base is None:
            able = " or ".join(f"{m.name!r} (Q{m.title})" for m in records().values() if m.quantized_base)
            raise RecipeError(
                f"quantization={self.quantization!r} needs a method that trains on a quantised base: {able}. "
                f"{self.method} takes its SVD or its update from the full-precision weights; fix: set quantization: "
                "none",
                key="quantization",
            )
        for key in ("model", "dataset", "prompt_field", "answer_field", "messages_field", "output_dir"):
            if not getattr(self, key).strip():
                raise RecipeError(f"{key} is empty; fix: set {key} (see recipes/configs/lora.yaml)", key=key)
        check_positive_int("train_size", self.train_size, "the number of training examples")
        check_positive_int("eval_size", self.eval_size, "the number of held-out examples the metrics are computed on")
        check_positive_int("max_length", self.max_length, "tokens per example, prompt and answer together")
        check_finite_numbers("method_config", self.method_config)
        check_finite_numbers("training", self.training)
        check_repo_id("push_to_hub", self.push_to_hub)
        check_repo_id("hub_base_model", self.hub_base_model)
        if self.hub_datasets is not None and not all(isinstance(d, str) and d.strip() for d in self.hub_datasets):
            raise RecipeError(
                f"hub_datasets must be a list of Hub dataset ids, got {self.hub_datasets!r}; fix: set "
                "hub_datasets to [user/name, ...]",
                key="hub_datasets",
            )

    @property
    def quantized(self) -> Quantization:
        return Quantization(self.quantization)

    @property
    def record(self):
        """The method's record (:class:`subspace_peft.registry.Method`): what it needs, read by the guards."""
        return records()[self.method]


# -- 1. configure: the command line over the YAML file, then every check before anything loads ---------------------


def command_line():
    """The recipe's ``HfArgumentParser``: a flag per recipe field and per TrainingArguments field."""
    from transformers import TrainingArguments

    from cli import RecipeArgumentParser

    rates = ", ".join(
        f"{m.name} {m.recipe_learning_rate:g}"
        + (f" ({m.recipe_learning_rate_quantized:g} quantised)" if m.recipe_learning_rate_quantized else "")
        for m in RECORDS.values()
    )
    defaults = {**TRAINING_DEFAULTS, "learning_rate": f"the method's measured rate: {rates}"}
    return RecipeArgumentParser(FinetuneRecipe, TrainingArguments, description=__doc__, training_defaults=defaults)


def default_learning_rate(recipe: FinetuneRecipe) -> float:
    """The method's rate (its ``recipes/configs`` file's, the best of ``benchmarks/bench_quality.py``'s sweep), with
    a quantised base the quantised rate where one was measured."""
    record = recipe.record
    if recipe.quantization != "none" and record.recipe_learning_rate_quantized is not None:
        return record.recipe_learning_rate_quantized
    return record.recipe_learning_rate


def configure(argv: Optional[list[str]] = None) -> FinetuneRecipe:
    """The recipe from ``argv`` (``--config`` file, then the flags, key by key); bad input is a RecipeError."""
    return command_line().parse(argv)


def peft_config(recipe: FinetuneRecipe):
    """The method's config from ``method_config`` (and the quantisation's changes to it); a key the config does not
    have, or a value it rejects, is a :class:`RecipeError` naming it."""
    import dataclasses

    from peft import TaskType

    config_class = recipe.record.config_cls
    config_fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(recipe.method_config) - set(config_fields))
    if unknown and recipe.method_config == FinetuneRecipe().method_config:
        raise RecipeError(
            f"method_config is not set, and the default one is {DEFAULT_METHOD.title}'s ({unknown} "
            f"are no {config_class.__name__} fields); fix: set method_config for {recipe.method} (see "
            f"recipes/configs/{recipe.method}.yaml)",
            key="method",
        )
    if unknown:
        import difflib

        hints = [m[0] for k in unknown for m in [difflib.get_close_matches(str(k), list(config_fields), n=1)] if m]
        raise RecipeError(
            f"method_config: {config_class.__name__} has no field(s) {unknown}"
            f"{f' (did you mean {hints}?)' if hints else ''}; fix: use the fields its docstring lists",
            key=f"method_config.{unknown[0]}",
        )
    values = dict(recipe.method_config)
    for key, value in values.items():  # PyYAML reads 1e-3 (no dot) as a string
        if isinstance(config_fields[key].default, float) and isinstance(value, str) and as_float(value) is not None:
            values[key] = as_float(value)
    values.update(recipe.quantized.method_config_changes(recipe.record, recipe.dtype, values))
    try:
        return config_class(task_type=TaskType.CAUSAL_LM, **values)
    except (ValueError, TypeError) as error:
        raise RecipeError(
            f"method_config: {config_class.__name__} rejects it: {one_line(error)}; fix: correct the value it names",
            key="method_config",
        ) from None


# TrainingArguments keys with a range the recipe checks before anything loads (the rest TrainingArguments checks)
_POSITIVE_TRAINING_INTS = {
    "max_steps": "the number of optimizer steps the recipe trains for; -1 trains for num_train_epochs instead",
    "per_device_train_batch_size": "training examples per device and step",
    "per_device_eval_batch_size": "held-out examples per device and evaluation batch",
    "gradient_accumulation_steps": "batches accumulated per optimizer step",
}
_TRAINING_RANGES = {  # key: (low, high, low_open)
    "learning_rate": (0.0, None, True),
    "num_train_epochs": (0.0, None, True),
    "weight_decay": (0.0, None, False),
    "warmup_ratio": (0.0, 1.0, False),
    "warmup_steps": (0.0, None, False),
    "max_grad_norm": (0.0, None, False),
    "logging_steps": (0.0, None, True),
    "save_steps": (0.0, None, True),
    "eval_steps": (0.0, None, True),
    "adam_beta1": (0.0, 1.0, False),
    "adam_beta2": (0.0, 1.0, False),
    "adam_epsilon": (0.0, None, True),
}


def training_arguments_class(recipe: FinetuneRecipe):
    """transformers' TrainingArguments, or TRL's SFTConfig (a subclass) under ``trainer: trl``."""
    if recipe.trainer == "trl":
        from trl import SFTConfig

        return SFTConfig
    from transformers import TrainingArguments

    return TrainingArguments


def training_arguments(recipe: FinetuneRecipe):
    """TrainingArguments (SFTConfig under ``trainer: trl``) from the recipe's defaults and ``training``; an unknown
    key, a wrong type or a value out of range (learning rate <= 0 or NaN, max_steps or a batch size < 1, ...) is a
    :class:`RecipeError` keyed ``training.<key>``."""
    import dataclasses
    import difflib
    import typing

    arguments_class = training_arguments_class(recipe)
    known = {f.name: f for f in dataclasses.fields(arguments_class) if f.init}
    unknown = sorted(str(k) for k in recipe.training if k not in known)
    if unknown:
        hints = [m[0] for k in unknown for m in [difflib.get_close_matches(k, list(known), n=1)] if m]
        raise RecipeError(
            f"training: unknown key(s) {unknown}{f' (did you mean {hints}?)' if hints else ''}; fix: "
            f"use {arguments_class.__name__} field names",
            key=f"training.{unknown[0]}",
        )
    # no use_cpu: transformers picks the device itself, and use_cpu=True would turn off DDP's gradient all-reduce
    # in a CPU run under accelerate launch
    values = {
        **TRAINING_DEFAULTS,
        "learning_rate": default_learning_rate(recipe),
        "seed": recipe.seed,
        "data_seed": recipe.seed,
        "output_dir": recipe.output_dir,
        "eval_strategy": "steps",
    }
    if recipe.trainer == "trl":
        values.update(TRL_DEFAULTS, max_length=recipe.max_length)
    values.update(recipe.training)
    values.update(_deepspeed_mixed_precision(recipe))
    values.setdefault("eval_steps", values["save_steps"])
    hints = typing.get_type_hints(arguments_class)
    for key, value in list(values.items()):  # PyYAML reads 1e-4 (no dot) as a string
        if key in known and isinstance(known[key].default, float) and isinstance(value, str):
            values[key] = as_float(value) if as_float(value) is not None else value
        if hints.get(key) is bool and not isinstance(value, bool):
            raise RecipeError(
                f"training.{key} must be true or false, got {value!r}; fix: set it to true or false",
                key=f"training.{key}",
            )
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
        return arguments_class(**values)
    except (TypeError, ValueError) as error:
        named = [k for k, v in recipe.training.items() if k in str(error) or (isinstance(v, str) and v in str(error))]
        raise RecipeError(
            f"training: {arguments_class.__name__} rejects it: {one_line(error)}; fix: correct the key it names",
            key=f"training.{named[0]}" if named else "training",
        ) from None


def _deepspeed_mixed_precision(recipe: FinetuneRecipe) -> dict:
    """Under ``accelerate launch`` with DeepSpeed, its config takes the launch's ``mixed_precision`` (bf16 in the
    shipped deepspeed_zero3.yaml) and transformers refuses TrainingArguments that differ: ``{"bf16": True}`` (or
    fp16) to match, unless the recipe's ``training`` says otherwise, which is refused here, before loading."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return {}
    mixed = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if mixed not in ("bf16", "fp16"):
        return {}
    if recipe.training.get(mixed) is False:
        raise RecipeError(
            f"training.{mixed} is false, but the accelerate config launches DeepSpeed with mixed_precision: {mixed}, "
            f"which DeepSpeed's config takes; fix: remove training.{mixed}, or set mixed_precision: no in the "
            "accelerate config",
            key=f"training.{mixed}",
        )
    return {mixed: True}


def hub_base_model(recipe: FinetuneRecipe) -> Optional[str]:
    """The Hub id a pushed adapter names as its base model: ``hub_base_model``, else the packaged SmolLM2's Hub id,
    else ``model`` when it is a Hub id; None for a local folder without ``hub_base_model``."""
    from subspace_peft.packaged_models import SMOLLM2_HUB_ID

    if recipe.hub_base_model:
        return recipe.hub_base_model
    if recipe.model == "smollm2":
        return SMOLLM2_HUB_ID
    return None if os.path.exists(recipe.model) else recipe.model


def push_arguments(recipe: FinetuneRecipe) -> dict:
    """``subspace_peft.push_adapter``'s keyword arguments for the Hub fields, checked before anything trains."""
    import inspect

    base_model = hub_base_model(recipe)
    if base_model is None:
        raise RecipeError(
            f"push_to_hub: the model {recipe.model} is a local folder, and a pushed adapter names its "
            "base model by Hub id; fix: pass --hub_base_model <the Hub id of the model in that folder>",
            key="push_to_hub",
        )
    wanted = {"base_model": base_model, "license": recipe.hub_license, "datasets": recipe.hub_datasets}
    accepted = inspect.signature(subspace_peft.push_adapter).parameters
    given = {"base_model": recipe.hub_base_model, "license": recipe.hub_license, "datasets": recipe.hub_datasets}
    refused = [name for name, value in given.items() if value is not None and name not in accepted]
    if refused:
        raise RecipeError(
            f"push_to_hub: this subspace_peft's push_adapter takes no {refused} argument; fix: update "
            f"subspace-peft, or leave out {', '.join('--hub_' + n.split('_')[0] for n in refused)}",
            key="push_to_hub",
        )
    # the derived base model id goes where push_adapter takes it; an older one reads it from the model config
    return {name: value for name, value in wanted.items() if value is not None and name in accepted}


class CheckedInputs(NamedTuple):
    config: object  # the method's peft config
    rows: tuple  # (train rows, eval rows)
    args: object  # TrainingArguments (SFTConfig under trainer: trl)
    resume_from: Optional[str]  # the checkpoint to resume from (None: a new run)
    push: Optional[dict] = None  # push_adapter's Hub keyword arguments (None: no push)


def checked_inputs(recipe: FinetuneRecipe) -> CheckedInputs:
    """Every check of the recipe's input, done before any model is loaded or anything is written: the method
    config, the model source, the data, the training arguments, the checkpoint to resume from, the Hub fields. A
    problem is a :class:`RecipeError` naming the file and line (or flag) of the key at fault."""
    with located(recipe):  # the checks that need no heavy import first: their errors come in a fraction of a second
        check_model_source(recipe)
        problem = launch_problem(recipe.record, recipe.quantization)
        if problem:
            raise RecipeError(f"accelerate config: {problem}")
        check_output_dir("output_dir", recipe.output_dir)
        rows = load_rows(recipe)
        save_only_model = bool(recipe.training.get("save_only_model", False))
        resume_from = last_complete_checkpoint(recipe.output_dir, save_only_model) if recipe.resume else None
        config = peft_config(recipe)
        args = training_arguments(recipe)
        push = push_arguments(recipe) if recipe.push_to_hub else None
    return CheckedInputs(config, rows, args, resume_from, push)


# -- 2. load the model ------------------------------------------------------------------------------------------------


def model_path(recipe: FinetuneRecipe) -> str:
    from subspace_peft.packaged_models import smollm2_path

    return smollm2_path() if recipe.model == "smollm2" else recipe.model


def check_model_source(recipe: FinetuneRecipe) -> None:
    """``model`` names the packaged model, a local model folder whose config.json parses, or a Hub model id;
    else a :class:`RecipeError` (nothing is loaded)."""
    if recipe.model == "smollm2":
        from subspace_peft.packaged_models import smollm2_missing

        missing = smollm2_missing()
        if missing:
            raise RecipeError(
                f"model: smollm2 (the packaged SmolLM2-135M-Instruct) is not installed; fix: {missing}, "
                "or set model to a local model folder or a Hub model id",
                key="model",
            )
    else:
        check_pretrained_source(
            "model",
            recipe.model,
            "config.json",
            "fix: set model to smollm2, a local model folder (config.json and safetensors) or a Hub model id",
        )


def load_tokenizer(recipe: FinetuneRecipe):
    """The model's tokenizer, with an eos and a pad token, padding on the right; a model it cannot be loaded from is
    a RecipeError."""
    from transformers import AutoTokenizer

    path = model_path(recipe)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise RecipeError(
            f"model: no tokenizer could be loaded from {path!r} ({type(error).__name__}: "
            f"{one_line(error)}); fix: set model to smollm2, a local model folder with its tokenizer or "
            "a Hub model id",
            key="model",
        ) from None
    if tokenizer.eos_token_id is None:  # e.g. a BERT-style tokenizer: its separator ends an answer
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model_kwargs(recipe: FinetuneRecipe) -> dict:
    """from_pretrained's keyword arguments: the dtype, and the quantisation's (QLoRA: the bitsandbytes config)."""
    import torch

    dtype = getattr(torch, recipe.dtype)
    return dict(dtype=dtype, use_safetensors=True, **recipe.quantized.model_kwargs(recipe.record, dtype))


def load_model(recipe: FinetuneRecipe, tokenizer=None):
    """(model, tokenizer) of ``recipe.model`` (the tokenizer is loaded unless given)."""
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(recipe)
    return AutoModelForCausalLM.from_pretrained(model_path(recipe), **load_model_kwargs(recipe)), tokenizer


def fsdp_storage_mismatch(recipe: FinetuneRecipe, mixed_precision: str) -> Optional[str]:
    """:func:`guards.fsdp_storage_mismatch` for this recipe's quantisation and dtype."""
    return _fsdp_storage_mismatch(recipe.quantization, recipe.dtype, mixed_precision)


# -- 3. build the adapter ---------------------------------------------------------------------------------------------


def build_adapter(model, config):
    """The peft model of ``config`` around ``model`` (the method's SVD or init runs here)."""
    from peft import get_peft_model

    model = get_peft_model(model, config)
    keep_4bit_layers_on_the_training_path(model)
    model.print_trainable_parameters()
    return model


# -- 4. data ----------------------------------------------------------------------------------------------------------


def prepare_data(recipe: FinetuneRecipe, tokenizer, train_rows: list[dict], eval_rows: list[dict]):
    """(train set, held-out set), tokenised (``Dataset.map``): loss on the answer, or on the assistant turns."""
    with located(recipe):
        train_set = tokenize(train_rows, tokenizer, recipe.max_length)
        eval_set = tokenize(eval_rows, tokenizer, recipe.max_length)
        check_answers_fit(recipe.max_length, "held-out", eval_set)
        check_answers_fit(recipe.max_length, "training", train_set)
    return train_set, eval_set


# -- 5. train ---------------------------------------------------------------------------------------------------------


def make_trainer(recipe: FinetuneRecipe, model, tokenizer, args, train_set, eval_set):
    """transformers' Trainer with ``DataCollatorForSeq2Seq``, or TRL's SFTTrainer (``trainer: trl``), which takes the
    tokenised sets as they are (they hold labels) and pads them with its own collator; for a method with a
    regulariser (Effort), with :func:`subspace_peft.add_regulariser_callback`."""
    if recipe.trainer == "trl":
        from trl import SFTTrainer

        trainer = SFTTrainer(
            model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, processing_class=tokenizer
        )
    else:
        from transformers import Trainer

        trainer = Trainer(
            model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, data_collator=collate(tokenizer)
        )
    if subspace_peft.callbacks.regularised_tuner(model) is not None:  # Effort: logs its regulariser, counted
        subspace_peft.add_regulariser_callback(trainer)  # once per optimizer step under gradient accumulation
    check_distribution_took_effect(trainer, recipe.quantization, recipe.dtype)
    return trainer


def train(trainer, resume_from: Optional[str]) -> None:
    trainer.train(resume_from_checkpoint=resume_from)


# -- 6. evaluate ------------------------------------------------------------------------------------------------------


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


# -- 7. save and push -------------------------------------------------------------------------------------------------


def training_summary(recipe: FinetuneRecipe, trainer, metrics: dict) -> dict:
    """The model card's training section: data, steps, rate, batch, quantisation, the metrics before and after."""
    before, after, args = metrics["before"], metrics["after"], trainer.args
    return {
        "data": recipe.dataset,
        "steps": trainer.state.global_step,
        "trainer": recipe.trainer,
        "learning rate": args.learning_rate,
        "batch size per device": args.per_device_train_batch_size,
        "quantization": recipe.quantization,
        "eval loss before / after": f"{before['eval_loss']:.4f} / {after['eval_loss']:.4f}",
        "exact match before / after": f"{before['exact_match']:.3f} / {after['exact_match']:.3f}",
    }


def save_and_push(recipe: FinetuneRecipe, trainer, model, metrics: dict, push: Optional[dict]) -> None:
    """adapter/ (with our model card as its README.md), loss.png and metrics.json in ``output_dir`` (process 0), and
    the push to the Hub if asked."""
    # under FSDP every rank takes part in gathering the sharded adapter (FSDP2: get_model_state_dict, full)
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped) if trainer.is_fsdp_enabled else None
    if not trainer.is_world_process_zero():
        return
    adapter_dir = os.path.join(recipe.output_dir, "adapter")
    model.save_pretrained(adapter_dir, state_dict=state_dict)
    summary = training_summary(recipe, trainer, metrics)
    # peft's save_pretrained writes its empty template; the card names the Hub id of the base where one is known
    card = subspace_peft.model_card(model, adapter_dir, training_summary=summary, base_model=hub_base_model(recipe))
    with open(os.path.join(adapter_dir, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(card)
    save_loss_curve(trainer.state.log_history, os.path.join(recipe.output_dir, "loss.png"))
    with open(os.path.join(recipe.output_dir, "metrics.json"), "w") as handle:
        json.dump(metrics, handle, indent=2)
    if recipe.push_to_hub:
        url = subspace_peft.push_adapter(model, recipe.push_to_hub, training_summary=summary, **(push or {}))
        print(f"pushed: {url}")


def saved_weights(trainer) -> str:
    """Which weights the adapter holds: the Trainer's convention (the last step's, or with load_best_model_at_end
    the best checkpoint's by metric_for_best_model)."""
    state, args = trainer.state, trainer.args
    if args.load_best_model_at_end and state.best_model_checkpoint:
        metric = args.metric_for_best_model or "loss"
        return (
            f"the best checkpoint by eval {metric} ({os.path.basename(state.best_model_checkpoint)}, "
            "load_best_model_at_end)"
        )
    return (
        f"the last step's (step {state.global_step}; for the best checkpoint instead set load_best_model_at_end: "
        "true with eval_strategy and save_strategy steps)"
    )


def report(recipe: FinetuneRecipe, trainer, metrics: dict) -> str:
    """What the run did and where it went, with the lines that load the adapter (printed at the end of a run)."""
    adapter_dir = os.path.join(os.path.abspath(recipe.output_dir), "adapter")
    before, after = metrics["before"], metrics["after"]
    ours = not recipe.record.peft_builtin
    lines = [
        "",
        f"output folder: {os.path.abspath(recipe.output_dir)} (loss.png, metrics.json, checkpoint-*/)",
        f"adapter:       {adapter_dir}",
        f"               holds {saved_weights(trainer)}",
        f"eval loss:     {before['eval_loss']:.4f} -> {after['eval_loss']:.4f} (held-out answers)",
        f"exact match:   {before['exact_match']:.3f} -> {after['exact_match']:.3f}",
        "load it:",
        *(["    import subspace_peft  # registers the method with peft"] if ours else []),
        "    from peft import AutoPeftModelForCausalLM",
        f'    model = AutoPeftModelForCausalLM.from_pretrained("{adapter_dir}")',
    ]
    return "\n".join(lines)


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


# -- the run ----------------------------------------------------------------------------------------------------------


def run(recipe: FinetuneRecipe, inputs: Optional[CheckedInputs] = None) -> dict:
    """Train and evaluate; ``inputs`` is :func:`checked_inputs` of ``recipe`` if the caller already has it. Bad
    input raises :class:`RecipeError` (a ValueError) before the model is loaded."""
    config, (train_rows, eval_rows), args, resume_from, push = inputs if inputs is not None else checked_inputs(recipe)
    with located(recipe):
        tokenizer = load_tokenizer(recipe)
    train_set, eval_set = prepare_data(recipe, tokenizer, train_rows, eval_rows)
    model, tokenizer = load_model(recipe, tokenizer)
    model = build_adapter(model, config)
    trainer = make_trainer(recipe, model, tokenizer, args, train_set, eval_set)
    # Not trainer.evaluate() before trainer.train(): accelerate then marks the model as prepared for evaluation and a
    # distributed run trains without DDP's gradient all-reduce (transformers 5.x, measured).
    before = evaluate(model, eval_set, tokenizer, "before", gather_partitioned=True)
    train(trainer, resume_from)
    after = evaluate(model, eval_set, tokenizer, "after")
    metrics = {
        "before": before,
        "after": after,
        "method": recipe.method,
        "trainer": recipe.trainer,
        "steps": trainer.state.global_step,
        "learning_rate": args.learning_rate,
        "trainable_parameters": model.get_nb_trainable_parameters()[0],
    }
    save_and_push(recipe, trainer, model, metrics, push)
    if trainer.is_world_process_zero():
        print(report(recipe, trainer, metrics))
    return metrics


def main(argv: Optional[list[str]] = None) -> None:
    """The command line: a bad input is ``error: <one line>`` on stderr and exit status 2 (as argparse's)."""
    try:
        run(configure(argv))
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
