"""Fine-tune a causal LM with any of our methods (or LoRA) through transformers' Trainer and accelerate.

    python recipes/finetune.py                                   # the default: SmolLM2-135M, PiSSA, CPU, minutes
    accelerate launch recipes/finetune.py --config recipes/configs/pissa.yaml [--max_steps 200 ...]

The YAML (recipes/configs/*.yaml) names the model, the data, the method and its config, the quantisation and the
training arguments; ``--key value`` flags override it. Before and after training the recipe prints the held-out
loss and the exact-match rate of greedy answers. The output folder gets the adapter (safetensors), checkpoints
(``--resume true`` continues from the last one), ``loss.png`` and ``metrics.json``; ``--push_to_hub user/repo``
pushes the adapter with a model card (method, ranks, trainable parameters, training summary, loading code).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from common import load_recipe

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
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.quantization != "none" and self.method not in ("lora", "pissa"):
            raise ValueError(
                f"quantization={self.quantization!r} needs a method that trains on a quantised base: 'lora' (QLoRA) "
                f"or 'pissa' (QPiSSA). {self.method} takes its SVD or its update from the full-precision weights; "
                "set quantization: none"
            )


def peft_config(recipe: FinetuneRecipe):
    """The method's config from ``method_config``; a key the config does not have is a ValueError naming it."""
    import dataclasses

    from peft import LoraConfig, TaskType

    import subspace_peft

    classes = {"lora": LoraConfig, "pissa": subspace_peft.PiSSAConfig, "svfit": subspace_peft.SVFitConfig,
               "flora": subspace_peft.FLoRAConfig, "effort": subspace_peft.EffortConfig}
    config_class = classes[recipe.method]
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(recipe.method_config) - known)
    if unknown:
        raise ValueError(f"{config_class.__name__} has no field(s) {unknown}; see its docstring for the fields")
    values = dict(recipe.method_config)
    if recipe.method == "pissa" and recipe.quantization != "none":
        values["residual_quantization"] = "nf4" if recipe.quantization == "4bit" else "int8"
        if recipe.quantization == "4bit":  # stored in the dtype FSDP shards in, as for QLoRA below
            values.setdefault("residual_quant_storage", recipe.dtype)
    return config_class(task_type=TaskType.CAUSAL_LM, **values)


def load_rows(recipe: FinetuneRecipe) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows with the prompt and answer fields, checked before anything trains."""
    from data import arithmetic_rows

    if recipe.dataset == "builtin:arithmetic":
        return arithmetic_rows(recipe.train_size, recipe.seed), arithmetic_rows(recipe.eval_size, recipe.seed + 1)
    from datasets import load_dataset

    extension = os.path.splitext(recipe.dataset)[1].lstrip(".")
    if os.path.isfile(recipe.dataset):
        data = load_dataset({"jsonl": "json"}.get(extension, extension), data_files=recipe.dataset)["train"]
    else:
        data = load_dataset(recipe.dataset)["train"]
    missing = [f for f in (recipe.prompt_field, recipe.answer_field) if f not in data.column_names]
    if missing:
        raise ValueError(f"dataset {recipe.dataset!r} has no column(s) {missing}; its columns are "
                         f"{data.column_names} (set prompt_field / answer_field)")
    rows = [{"prompt": r[recipe.prompt_field], "answer": r[recipe.answer_field]} for r in data]
    split = max(1, min(recipe.eval_size, len(rows) // 5))
    return rows[split:][: recipe.train_size], rows[:split]


def training_arguments(recipe: FinetuneRecipe):
    """transformers' TrainingArguments from the defaults and ``training``; an unknown key is a ValueError."""
    from transformers import TrainingArguments

    # no use_cpu: transformers picks the device itself, and use_cpu=True would turn off DDP's gradient all-reduce
    # in a CPU run under accelerate launch
    values = {**TRAINING_DEFAULTS, "output_dir": recipe.output_dir, "eval_strategy": "steps", **recipe.training}
    values.setdefault("eval_steps", values["save_steps"])
    try:
        return TrainingArguments(**values)
    except TypeError as error:
        raise ValueError(f"training: {error} (keys are TrainingArguments fields)") from None


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


def last_complete_checkpoint(output_dir: str) -> str:
    """The newest ``checkpoint-N`` whose ``trainer_state.json`` (which Trainer writes last) reads as JSON: a run
    killed while saving leaves a newer, incomplete folder, and resuming from it would fail."""
    import re

    steps = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match:
            steps.append((int(match.group(1)), os.path.join(output_dir, name)))
    for _, path in sorted(steps, reverse=True):
        try:
            with open(os.path.join(path, "trainer_state.json")) as handle:
                json.load(handle)
            return path
        except (OSError, ValueError):
            print(f"skipping incomplete checkpoint {path}", file=sys.stderr)
    raise ValueError(f"resume: no complete checkpoint in {output_dir} to resume from")


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


def load_model(recipe: FinetuneRecipe):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from packaged_models import smollm2_path

    path = smollm2_path() if recipe.model == "smollm2" else recipe.model
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token_id is None:  # e.g. a BERT-style tokenizer: its separator ends an answer
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(path, **load_model_kwargs(recipe)), tokenizer


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
        sys.exit(f"recipes/finetune.py: {mismatch}")
    if trainer.is_fsdp_enabled and not trainer.accelerator.is_fsdp2:
        # FSDP1 inserts wrapper modules, and peft then finds no adapter under their names: it saves an empty adapter
        sys.exit("recipes/finetune.py: FSDP1 is not supported; set fsdp_version: 2 (recipes/accelerate/fsdp.yaml)")
    if (world_size > 1 and trainer.accelerator.num_processes != world_size) or (asked and asked[0] != got):
        sys.exit(
            f"recipes/finetune.py: the launch asked for {asked[0] if asked else 'distribution'} over {world_size} "
            f"process(es) but accelerate set up {got} with {trainer.accelerator.num_processes}. FSDP and DeepSpeed "
            "need GPUs; on CPU use DDP: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N "
            "recipes/finetune.py"
        )


def checked_inputs(recipe: FinetuneRecipe) -> tuple:
    """(method config, (train rows, eval rows), TrainingArguments): every check of the recipe's input, done before
    any model is loaded or anything is written."""
    return peft_config(recipe), load_rows(recipe), training_arguments(recipe)


def run(recipe: FinetuneRecipe, inputs: Optional[tuple] = None) -> dict:
    """Train and evaluate; ``inputs`` is :func:`checked_inputs` of ``recipe`` if the caller already has it."""
    from peft import get_peft_model
    from transformers import Trainer

    config, (train_rows, eval_rows), args = inputs if inputs is not None else checked_inputs(recipe)
    model, tokenizer = load_model(recipe)
    model = get_peft_model(model, config)
    keep_4bit_layers_on_the_training_path(model)
    model.print_trainable_parameters()
    trainer = Trainer(model=model, args=args, train_dataset=tokenize(train_rows, tokenizer, recipe.max_length),
                      eval_dataset=tokenize(eval_rows, tokenizer, recipe.max_length),
                      data_collator=collate(tokenizer.pad_token_id))
    check_distribution_took_effect(trainer, recipe)
    # Not trainer.evaluate() before trainer.train(): accelerate then marks the model as prepared for evaluation and a
    # distributed run trains without DDP's gradient all-reduce (transformers 5.x, measured).
    before = answer_metrics(model, trainer.eval_dataset, trainer.data_collator)
    print(f"before: {json.dumps(before)}")
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(recipe.output_dir) if recipe.resume else None)
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a YAML recipe (recipes/configs/*.yaml); without it the defaults run")
    args, overrides = parser.parse_known_args(argv)
    try:
        recipe = load_recipe(FinetuneRecipe, args.config, overrides)
        inputs = checked_inputs(recipe)
    except (ValueError, TypeError) as error:
        sys.exit(f"recipes/finetune.py: {error}")
    run(recipe, inputs)


if __name__ == "__main__":
    main()
