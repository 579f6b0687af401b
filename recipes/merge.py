"""Merge task-specific fine-tunes (full models or peft adapters of one base) from a YAML file.

    python recipes/merge.py --config recipes/configs/merge.yaml [--method ties --scaling 0.5 ...]

Methods: task_arithmetic, ties, dare, concrete_task_arithmetic, concrete_adamerging (the Concrete ones need each
task's unlabeled texts, a JSON-lines file with a ``text`` field). The merged model is written with
``save_pretrained`` (safetensors) to ``output_dir``, with the base's tokenizer, and, for Concrete methods with
``save_masks: true``, the final masks as ``masks.safetensors``. Command-line flags override the YAML.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Optional

from common import load_recipe

METHODS = ("task_arithmetic", "ties", "dare", "concrete_task_arithmetic", "concrete_adamerging")


@dataclass
class MergeRecipe:
    base: str
    tasks: list  # [{"name": ..., "model": dir} or {"name": ..., "adapter": dir}, "unlabeled": jsonl]
    method: str = "task_arithmetic"
    model_class: str = "AutoModelForSequenceClassification"
    output_dir: str = "merged"
    scaling: float = 0.3
    density: float = 0.2
    drop_rate: float = 0.9
    steps: int = 200
    lr: float = 1e-3
    lambda_lr: float = 1e-3
    lambda_granularity: str = "task"
    temperature: float = 0.5
    initial_logits: float = 0.0
    final_mask: str = "expectation"
    modules: Optional[list] = None
    seed: int = 0
    batch_size: int = 16
    max_length: int = 64
    save_masks: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not self.tasks:
            raise ValueError("tasks is empty: list at least one fine-tuned model or adapter")
        for index, task in enumerate(self.tasks):
            if ("model" in task) == ("adapter" in task):
                raise ValueError(f"task {index} ({task.get('name', '?')}) needs exactly one of 'model' or 'adapter'")
            if self.method.startswith("concrete") and not task.get("unlabeled"):
                raise ValueError(
                    f"task {index} ({task.get('name', '?')}) has no 'unlabeled' file, which {self.method} needs "
                    "(a JSON-lines file with a 'text' field)"
                )


def _unlabeled_batches(path: str, tokenizer, batch_size: int, max_length: int) -> list[dict]:
    with open(path) as handle:
        texts = [json.loads(line)["text"] for line in handle if line.strip()]
    if not texts:
        raise ValueError(f"{path} holds no texts")
    return [dict(tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt")) for i in range(0, len(texts), batch_size)]


def run(recipe: MergeRecipe) -> str:
    import torch
    import transformers
    from peft import PeftModel
    from safetensors.torch import save_file

    import subspace_peft  # noqa: F401  (registers our adapter types)
    from subspace_peft import merging

    model_class = getattr(transformers, recipe.model_class)
    load = dict(dtype=torch.float32, use_safetensors=True)
    base = model_class.from_pretrained(recipe.base, **load).eval()
    vectors = []
    for task in recipe.tasks:
        if "model" in task:
            vectors.append(merging.task_vector(base, model_class.from_pretrained(task["model"], **load)))
        else:
            adapted = PeftModel.from_pretrained(model_class.from_pretrained(recipe.base, **load), task["adapter"])
            vectors.append(merging.adapter_task_vector(adapted, base=base))
    if recipe.method == "task_arithmetic":
        merged, masks = merging.task_arithmetic(base, vectors, recipe.scaling), None
    elif recipe.method == "ties":
        merged, masks = merging.ties_merging(base, vectors, recipe.scaling, recipe.density), None
    elif recipe.method == "dare":
        merged, masks = merging.dare_merging(base, vectors, recipe.scaling, recipe.drop_rate, recipe.seed), None
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(recipe.base)
        unlabeled = [_unlabeled_batches(t["unlabeled"], tokenizer, recipe.batch_size, recipe.max_length)
                     for t in recipe.tasks]
        result = merging.concrete_merge(
            base, vectors, unlabeled, method=recipe.method.removeprefix("concrete_"), scaling=recipe.scaling,
            lambda_granularity=recipe.lambda_granularity, steps=recipe.steps, lr=recipe.lr,
            lambda_lr=recipe.lambda_lr, temperature=recipe.temperature, initial_logits=recipe.initial_logits,
            seed=recipe.seed, modules=recipe.modules, final_mask=recipe.final_mask, return_masks=recipe.save_masks,
        )
        merged, masks = result.model, result.masks
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the YAML recipe")
    args, overrides = parser.parse_known_args(argv)
    try:
        recipe = load_recipe(MergeRecipe, args.config, overrides)
    except ValueError as error:
        sys.exit(f"recipes/merge.py: {error}")
    run(recipe)


if __name__ == "__main__":
    main()
