"""Phase 5 of recipes/finetune.py: train, Trainer (or TRL's SFTTrainer) on the arguments phase 1 built and checked."""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Optional

import subspace_peft
from subspace_peft.recipe_tools.config import RecipeError, check_number, check_positive_int, one_line

from data import collate
from guards import check_distribution_took_effect

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


def default_learning_rate(recipe) -> float:
    """The method's rate (its ``recipes/configs`` file's, the best of ``benchmarks/bench_quality.py``'s sweep), with
    a quantised base the quantised rate where one was measured."""
    record = recipe.record
    if recipe.quantization != "none" and record.recipe_learning_rate_quantized is not None:
        return record.recipe_learning_rate_quantized
    return record.recipe_learning_rate


# TrainingArguments keys with a range the recipe checks before anything loads: TrainingArguments takes these values
# out of range without a word (transformers 5.x, tested) and training fails later, or silently does nothing; the
# rest (warmup_steps, warmup_ratio, ...) TrainingArguments checks itself
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
    "max_grad_norm": (0.0, None, False),
    "logging_steps": (0.0, None, True),
    "save_steps": (0.0, None, True),
    "eval_steps": (0.0, None, True),
    "adam_beta1": (0.0, 1.0, False),
    "adam_beta2": (0.0, 1.0, False),
    "adam_epsilon": (0.0, None, True),
}


def training_arguments_class(recipe):
    """transformers' TrainingArguments, or TRL's SFTConfig (a subclass) under ``trainer: trl``."""
    if recipe.trainer == "trl":
        from trl import SFTConfig

        return SFTConfig
    from transformers import TrainingArguments

    return TrainingArguments


def training_arguments(recipe):
    """TrainingArguments (SFTConfig under ``trainer: trl``) from the recipe's defaults and ``training``; an unknown
    key, a wrong type or a value out of range (learning rate <= 0 or NaN, max_steps or a batch size < 1, ...) is a
    :class:`RecipeError` keyed ``training.<key>``."""
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
    for key, value in values.items():
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


def _deepspeed_mixed_precision(recipe) -> dict:
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


def make_trainer(recipe, model, tokenizer, args, train_set, eval_set):
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
