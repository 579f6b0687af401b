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
called from Python raises it as :class:`~subspace_peft.recipe_tools.RecipeError` (a ValueError).

The run, :func:`run`, phase by phase: 1. configure (:func:`configure`, :func:`checked_inputs`: every check before
anything loads), 2. data (data.py), 3. load the model (loading.py), 4. build the adapter (adapter.py), 5. train
(training.py), evaluated before and after (evaluation.py), 6. save and push (saving.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import subspace_peft  # the method records (and our methods registered with peft)
from subspace_peft.methods import DEFAULT_METHOD
from subspace_peft.recipe_tools import RecipeArgumentParser
from subspace_peft.recipe_tools.checkpoints import checkpoint_problem, last_complete_checkpoint  # noqa: F401
from subspace_peft.recipe_tools.config import (  # noqa: F401
    RecipeError,
    check_choice,
    check_field_types,
    check_finite_numbers,
    check_output_dir,
    check_positive_int,
    check_repo_id,
    located,
    recipe_field,
)

# the phases' functions; the ones marked F401 are imported from here by tests and benchmarks/bench_quality.py
from adapter import build_adapter, peft_config
from data import collate, load_rows, prepare_data, tokenize  # noqa: F401
from evaluation import answer_metrics, answer_scores, evaluate, summarise  # noqa: F401
from guards import keep_4bit_layers_on_the_training_path, launch_problem  # noqa: F401
from loading import check_model_source, fsdp_storage_mismatch, load_model, load_model_kwargs, load_tokenizer  # noqa: F401
from quantization import Quantization
from saving import push_arguments, report, save_and_push, saved_weights  # noqa: F401
from training import TRAINING_DEFAULTS, _deepspeed_mixed_precision, make_trainer, train, training_arguments  # noqa: F401


def records() -> dict:
    """Every method the recipe can train, by name: each record registered so far (ours, peft's LoRA, a plugin's)."""
    return {method.name: method for method in subspace_peft.registry.known_methods()}


RECORDS = {method.name: method for method in subspace_peft.METHODS}  # the package's own: the help texts list them
METHODS = tuple(RECORDS)
QUANTIZATIONS = Quantization.names()
DTYPES = ("float32", "bfloat16", "float16")
TRAINERS = ("transformers", "trl")


@dataclass
class FinetuneRecipe:
    """The recipe's fields (each a ``--flag`` and a YAML key); ``training`` holds TrainingArguments' keys."""

    model: str = recipe_field(
        "smollm2", "smollm2 (the packaged SmolLM2-135M-Instruct), a local model folder (safetensors) or a Hub model id"
    )
    dataset: str = recipe_field(
        "builtin:arithmetic",
        "builtin:arithmetic, builtin:arithmetic-chat, a datasets name, or a local .json/.jsonl/.csv file",
    )
    prompt_field: str = recipe_field("prompt", "the data's prompt column (prompt/answer data)")
    answer_field: str = recipe_field(
        "answer", "the data's answer column (prompt/answer data; the loss is on the answer only)"
    )
    messages_field: str = recipe_field(
        "messages",
        "the data's conversation column (chat data: a list of {role, content}, rendered with the tokenizer's chat "
        "template; the loss is on the assistant turns only), used when the prompt/answer columns are absent",
    )
    train_size: int = recipe_field(2000, "training examples (after the held-out ones)")
    eval_size: int = recipe_field(64, "held-out examples (the data's first rows)")
    max_length: int = recipe_field(64, "tokens per example, prompt and answer together")
    method: str = recipe_field(DEFAULT_METHOD.name, f"the adapter: one of {', '.join(METHODS)}")
    method_config: dict = recipe_field(
        DEFAULT_METHOD.recipe_defaults,
        "the method's config fields as a mapping ({r: 8, target_modules: all-linear}); a flag merges into the "
        "file's key by key",
    )
    quantization: str = recipe_field(
        "none", f"one of {', '.join(QUANTIZATIONS)}: QLoRA (method lora) or QPiSSA (method pissa)"
    )
    dtype: str = recipe_field(
        "float32",
        f"the model's dtype, one of {', '.join(DTYPES)}; a 4-bit base is stored in it too (what FSDP shards)",
    )
    trainer: str = recipe_field(
        "transformers",
        "transformers (transformers.Trainer) or trl (TRL's SFTTrainer; its SFTConfig keys are allowed in training:)",
    )
    training: dict = recipe_field(
        {}, "TrainingArguments keys as a mapping (the file's training: block); each is also a flag of its own"
    )
    output_dir: str = recipe_field("runs/finetune", "the run's folder: adapter/, checkpoint-N/, loss.png, metrics.json")
    resume: bool = recipe_field(False, "continue from the last complete checkpoint in output_dir")
    push_to_hub: Optional[str] = recipe_field(
        None, "a Hub repo id (user/name): the adapter and a model card are pushed after training"
    )
    hub_base_model: Optional[str] = recipe_field(
        None,
        "the Hub id of the base model, written to the model card and the pushed adapter_config.json; default: "
        "HuggingFaceTB/SmolLM2-135M-Instruct for model smollm2, the model itself for a Hub id; needed for a local "
        "model folder",
    )
    hub_license: Optional[str] = recipe_field(None, "the model card's license (e.g. apache-2.0)")
    hub_datasets: Optional[list[str]] = recipe_field(None, "the model card's datasets (Hub dataset ids)")
    seed: int = recipe_field(
        0, "the data's and the training's seed (TrainingArguments seed and data_seed unless training: sets them)"
    )

    def __post_init__(self):
        """Types and ranges of every key, checked without touching any file, model or network: a
        :class:`RecipeError` naming the key and the fix (``recipe_tools.build_recipe`` adds the file and line)."""
        check_field_types(self)
        for key, allowed in (
            ("method", tuple(records())),
            ("dtype", DTYPES),
            ("quantization", QUANTIZATIONS),
            ("trainer", TRAINERS),
        ):
            check_choice(key, getattr(self, key), allowed)
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


def command_line():
    """The recipe's ``HfArgumentParser``: a flag per recipe field and per TrainingArguments field."""
    from transformers import TrainingArguments

    rates = ", ".join(
        f"{m.name} {m.recipe_learning_rate:g}"
        + (f" ({m.recipe_learning_rate_quantized:g} quantised)" if m.recipe_learning_rate_quantized else "")
        for m in RECORDS.values()
    )
    defaults = {**TRAINING_DEFAULTS, "learning_rate": f"the method's measured rate: {rates}"}
    return RecipeArgumentParser(FinetuneRecipe, TrainingArguments, description=__doc__, training_defaults=defaults)


def configure(argv: Optional[list[str]] = None) -> FinetuneRecipe:
    """The recipe from ``argv`` (``--config`` file, then the flags, key by key); bad input is a RecipeError."""
    return command_line().parse(argv)


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


def run(recipe: FinetuneRecipe, inputs: Optional[CheckedInputs] = None) -> dict:
    """Train and evaluate, the phases in the order they run; ``inputs`` is :func:`checked_inputs` of ``recipe`` if
    the caller already has it. Bad input raises :class:`RecipeError` (a ValueError) before the model is loaded."""
    # 1. configure: every check, before anything loads (the command line and the file are configure()'s, in main)
    config, (train_rows, eval_rows), args, resume_from, push = inputs if inputs is not None else checked_inputs(recipe)
    # 2. data: the model's tokenizer, then the training and held-out sets tokenised
    with located(recipe):
        tokenizer = load_tokenizer(recipe)
    train_set, eval_set = prepare_data(recipe, tokenizer, train_rows, eval_rows)
    # 3. load the model
    model, tokenizer = load_model(recipe, tokenizer)
    # 4. build the adapter
    model = build_adapter(model, config)
    # 5. train, evaluated on the held-out set before and after. Not trainer.evaluate() before trainer.train():
    # accelerate then marks the model as prepared for evaluation and a distributed run trains without DDP's gradient
    # all-reduce (transformers 5.x, measured).
    trainer = make_trainer(recipe, model, tokenizer, args, train_set, eval_set)
    before = evaluate(model, eval_set, tokenizer, "before", gather_partitioned=True)
    train(trainer, resume_from)
    after = evaluate(model, eval_set, tokenizer, "after")
    # 6. save and push
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
    command_line().main(run, argv)


if __name__ == "__main__":
    main()
