"""Phase 4 of recipes/finetune.py: build the adapter, the method's peft config (phase 1 checks it) around the model."""

from __future__ import annotations

from subspace_peft.methods import DEFAULT_METHOD
from subspace_peft.recipe_tools.config import RecipeError, one_line

from guards import keep_4bit_layers_on_the_training_path


def peft_config(recipe):
    """The method's config from ``method_config`` (and the quantisation's changes to it); a key the config does not
    have, or a value it rejects, is a :class:`RecipeError` naming it."""
    import dataclasses

    from peft import TaskType

    config_class = recipe.record.config_cls
    config_fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(recipe.method_config) - set(config_fields))
    if unknown and recipe.method_config == dict(DEFAULT_METHOD.recipe_defaults):  # the recipe's default
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
    values.update(recipe.quantized.method_config_changes(recipe.record, recipe.dtype, values))
    try:
        return config_class(task_type=TaskType.CAUSAL_LM, **values)
    except (ValueError, TypeError) as error:
        raise RecipeError(
            f"method_config: {config_class.__name__} rejects it: {one_line(error)}; fix: correct the value it names",
            key="method_config",
        ) from None


def build_adapter(model, config):
    """The peft model of ``config`` around ``model`` (the method's SVD or init runs here)."""
    from peft import get_peft_model

    model = get_peft_model(model, config)
    keep_4bit_layers_on_the_training_path(model)
    model.print_trainable_parameters()
    return model
