"""Merge task-specific fine-tunes (full models or peft adapters of one base) from a YAML file.

    python recipes/merge.py --config recipes/configs/merge.yaml [--method ties --scaling 0.5 ...]

Methods: task_arithmetic, ties, dare, adamerging, concrete_task_arithmetic, concrete_adamerging (adamerging and the
Concrete ones need each task's unlabeled texts, a JSON-lines file with a ``text`` field). The merged model is written
with ``save_pretrained`` (safetensors) to ``output_dir``, with the base's tokenizer, and, for Concrete methods with
``save_masks: true``, the final masks as ``masks.safetensors``. Command-line flags override the YAML.

Bad input (the YAML, a flag, a model or adapter folder, an unlabeled file) stops the recipe before any model is
loaded with one line, ``error: <file:line or flag>: <key> ... fix: ...``, and exit status 2; ``run()`` called from
Python raises it as :class:`~subspace_peft.recipe_tools.RecipeError` (a ValueError).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, make_dataclass
from typing import Optional

from subspace_peft.merging import MERGE_METHODS, Parameter
from subspace_peft.merging.registry import all_parameters
from subspace_peft.recipe_tools import RecipeArgumentParser
from subspace_peft.recipe_tools.config import (
    RecipeError,
    check_choice,
    check_field_types,
    check_output_dir,
    check_positive_int,
    check_pretrained_source,
    located,
    one_line,
    owner_error,
    read_json_rows,
    recipe_field,
)

METHODS = tuple(MERGE_METHODS)
TASK_KEYS = ("name", "model", "adapter", "unlabeled")


@dataclass
class _RecipeKeys:
    """The recipe's keys but the merge methods' parameters: the inputs, the method and the recipe's own settings."""

    base: str = field(metadata={"help": "the base model: a local folder saved with save_pretrained, or a Hub id"})
    tasks: list[dict] = field(
        metadata={"help": "the fine-tunes: [{name, model: folder} or {name, adapter: folder}, unlabeled: jsonl]"}
    )
    method: str = recipe_field("task_arithmetic", f"the merge method: one of {', '.join(METHODS)}")
    model_class: str = recipe_field(
        "AutoModelForSequenceClassification", "the transformers auto class the models load as"
    )
    output_dir: str = recipe_field("merged", "the merged model's folder (save_pretrained, with the base's tokenizer)")
    batch_size: int = recipe_field(16, "unlabeled texts per batch")
    max_length: int = recipe_field(64, "tokens per unlabeled text")
    save_masks: bool = recipe_field(False, "write a Concrete method's final masks to output_dir/masks.safetensors")

    def __post_init__(self):
        """Types and ranges of every key, checked without touching any file or model: a :class:`RecipeError`
        naming the key and the fix (``recipe_tools.build_recipe`` adds the file and line)."""
        check_field_types(self)
        check_choice("method", self.method, METHODS)
        for parameter in all_parameters():
            if parameter.choices:
                check_parameter(parameter, getattr(self, parameter.name))
        for key in ("base", "model_class", "output_dir"):
            if not getattr(self, key).strip():
                raise RecipeError(f"{key} is empty; fix: set {key} (see recipes/configs/merge.yaml)", key=key)
        if not self.tasks:
            raise RecipeError("tasks is empty: fix: list at least one fine-tuned model or adapter", key="tasks")
        for index, task in enumerate(self.tasks):
            key = f"tasks[{index}]"
            if not isinstance(task, dict):
                raise RecipeError(
                    f"task {index} must be a mapping with 'name' and 'model' or 'adapter', got "
                    f"{task!r}; fix: write it as {{name: ..., model: path}}",
                    key=key,
                )
            label = f"task {index} ({task.get('name', '?')})"
            unknown = sorted(str(k) for k in task if k not in TASK_KEYS)
            if unknown:
                raise RecipeError(f"{label} has unknown key(s) {unknown}; fix: use only {list(TASK_KEYS)}", key=key)
            if ("model" in task) == ("adapter" in task):
                raise RecipeError(f"{label} needs exactly one of 'model' or 'adapter'; fix: keep one of them", key=key)
            for name, value in task.items():
                if name != "name" and (not isinstance(value, str) or not value.strip()):
                    raise RecipeError(
                        f"{label}: {name} must be a non-empty string, got {value!r}; fix: set it to a path (or a name)",
                        key=f"{key}.{name}",
                    )
            if self.merge_method.needs_unlabeled and not task.get("unlabeled"):
                raise RecipeError(
                    f"{label} has no 'unlabeled' file, which {self.method} needs (a JSON-lines file with a 'text' "
                    "field); fix: add 'unlabeled: path/to/texts.jsonl' to it",
                    key=key,
                )
        for parameter in all_parameters():
            if not parameter.choices:
                check_parameter(parameter, getattr(self, parameter.name))
        check_positive_int("batch_size", self.batch_size, "unlabeled texts per batch")
        check_positive_int("max_length", self.max_length, "tokens per unlabeled text")

    @property
    def merge_method(self):
        return MERGE_METHODS[self.method]

    def merge_parameters(self) -> dict:
        """The method's parameters, from the fields of the same names."""
        return {parameter.name: getattr(self, parameter.name) for parameter in self.merge_method.parameters}


def _parameter_type(parameter: Parameter):
    kind = list[str] if parameter.type is list else parameter.type
    return Optional[kind] if parameter.optional else kind


# the recipe's keys: its own, then one per parameter of the merge methods, generated from their schema (the registry,
# subspace_peft.merging.MERGE_METHODS, is the one source of each parameter's name, type, default and help)
MergeRecipe = make_dataclass(
    "MergeRecipe",
    [(p.name, _parameter_type(p), recipe_field(p.default, p.help)) for p in all_parameters()],
    bases=(_RecipeKeys,),
    namespace={"__module__": __name__, "__doc__": "The recipe's keys (each a --flag and a YAML key)."},
)


def check_parameter(parameter: Parameter, value) -> None:
    """``value`` fits ``parameter``'s schema (:meth:`Parameter.check`), else a :class:`RecipeError` keyed by its name.
    The recipe's field types are checked before (``check_field_types``)."""
    with owner_error(parameter.name):
        parameter.check(value, where="recipe")


def read_unlabeled(path: str, what: str, key: str) -> list[str]:
    """The texts of a JSON-lines file of ``{"text": ...}`` records; a missing file, malformed JSON, a record without
    a non-empty text or no text at all is a :class:`RecipeError` naming the file and line."""
    texts = []
    for where, record in read_json_rows(path, what, key=key):
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise RecipeError(
                f"{where}: expected a JSON object with a non-empty 'text' string ({what}), got "
                f'{one_line(json.dumps(record))[:80]}; fix: write one {{"text": "..."}} per line'
            )
        texts.append(text)
    if not texts:
        raise RecipeError(f'{what}: {path} holds no texts; fix: write one {{"text": "..."}} per line', key=key)
    return texts


def checked_inputs(recipe) -> Optional[list[list[str]]]:
    """Every check of the recipe's input, before any model is loaded or anything is written: the model class, the
    base and every task's folder (config.json / adapter_config.json parse; or a Hub repo id), the output folder and
    the unlabeled texts, which are returned (per task; None for methods that need none)."""
    import transformers

    with located(recipe):
        model_class = getattr(transformers, recipe.model_class, None)
        if not hasattr(model_class, "from_pretrained"):
            raise RecipeError(
                f"model_class {recipe.model_class!r} is no transformers model class; fix: set "
                "model_class to an auto class such as AutoModelForSequenceClassification",
                key="model_class",
            )
        fix = "fix: set it to a local folder saved with save_pretrained, or a Hub repo id"
        check_pretrained_source("base", recipe.base, "config.json", fix)
        for index, task in enumerate(recipe.tasks):
            kind = "model" if "model" in task else "adapter"
            check_pretrained_source(
                f"tasks[{index}].{kind}", task[kind], "config.json" if kind == "model" else "adapter_config.json", fix
            )
        check_output_dir("output_dir", recipe.output_dir)
        if not recipe.merge_method.needs_unlabeled:
            return None
        return [
            read_unlabeled(task["unlabeled"], f"tasks[{index}].unlabeled", f"tasks[{index}].unlabeled")
            for index, task in enumerate(recipe.tasks)
        ]


def _unlabeled_batches(texts: list[str], tokenizer, batch_size: int, max_length: int) -> list[dict]:
    return [
        dict(
            tokenizer(
                texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
        )
        for i in range(0, len(texts), batch_size)
    ]


def load_pretrained(model_class, path: str):
    """``model_class.from_pretrained(path)`` in float32 from safetensors (every model the recipe loads)."""
    import torch

    return model_class.from_pretrained(path, dtype=torch.float32, use_safetensors=True)


def run(recipe) -> str:
    """Merge and save; bad input raises :class:`RecipeError` (a ValueError) before any model is loaded."""
    import transformers
    from peft import PeftModel
    from safetensors.torch import save_file

    import subspace_peft  # noqa: F401  (registers our adapter types)
    from subspace_peft import merging

    texts = checked_inputs(recipe)
    model_class = getattr(transformers, recipe.model_class)
    base = load_pretrained(model_class, recipe.base).eval()
    vectors = []
    for task in recipe.tasks:
        if "model" in task:
            vectors.append(merging.task_vector(base, load_pretrained(model_class, task["model"])))
        else:
            adapted = PeftModel.from_pretrained(load_pretrained(model_class, recipe.base), task["adapter"])
            vectors.append(merging.adapter_task_vector(adapted, base=base))
    unlabeled = None
    if texts is not None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(recipe.base)
        unlabeled = [
            _unlabeled_batches(task_texts, tokenizer, recipe.batch_size, recipe.max_length) for task_texts in texts
        ]
    merged, masks = merging.merge(
        recipe.method, base, vectors, unlabeled, return_masks=recipe.save_masks, **recipe.merge_parameters()
    )
    os.makedirs(recipe.output_dir, exist_ok=True)
    merged.save_pretrained(recipe.output_dir, safe_serialization=True)
    try:
        transformers.AutoTokenizer.from_pretrained(recipe.base).save_pretrained(recipe.output_dir)
    except (OSError, ValueError):  # a base without a tokenizer: nothing to copy
        pass
    if masks is not None:
        save_file({k: v.contiguous() for k, v in masks.items()}, os.path.join(recipe.output_dir, "masks.safetensors"))
    print(f"merged {len(vectors)} tasks with {recipe.method} into {recipe.output_dir}")
    return recipe.output_dir


def main(argv: Optional[list[str]] = None) -> None:
    """The command line: a bad input is ``error: <one line>`` on stderr and exit status 2 (as argparse's)."""
    RecipeArgumentParser(MergeRecipe, description=__doc__).main(run, argv)


if __name__ == "__main__":
    main()
