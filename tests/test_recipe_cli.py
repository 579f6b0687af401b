"""The recipe command line (subspace_peft/recipe_tools/arguments.py, HfArgumentParser): a flag per recipe field and
per TrainingArguments field, each changing its key only over the YAML file; the README's recipe commands, parsed
exactly as written (and, marked slow, the accelerate one run through ``accelerate launch``)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import yaml
from test_recipe_errors import _rest, error_line, no_model_loading, write  # noqa: F401  (autouse fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "recipes"))

from subspace_peft.recipe_tools import RecipeError  # noqa: E402

import finetune  # noqa: E402
from quantization import Quantization  # noqa: E402
from readme_commands import makefile_recipe, readme_shell_commands  # noqa: E402

EFFORT = os.path.join(ROOT, "recipes", "configs", "effort.yaml")
with open(EFFORT, encoding="utf-8") as _handle:
    EFFORT_YAML = yaml.safe_load(_handle)  # the shipped values (learning rate measured by benchmarks/bench_quality.py)
EFFORT_LR = EFFORT_YAML["training"]["learning_rate"]
EFFORT_RANK = EFFORT_YAML["method_config"]["residual_rank"]


def readme_recipe_commands() -> list[list[str]]:
    """The recipe command lines README.md shows: `make demo` as the Makefile runs it, then each line that runs
    recipes/finetune.py, split as a shell splits them."""
    commands = readme_shell_commands()
    assert ["make", "demo"] in commands
    (demo,) = makefile_recipe("demo")
    assert demo == "$(PY) recipes/finetune.py $(ARGS)"
    return [["python", "recipes/finetune.py"]] + [c for c in commands if "recipes/finetune.py" in c]


def recipe_argv(command: list[str]) -> list[str]:
    return command[command.index("recipes/finetune.py") + 1 :]


def test_the_readme_commands_parse_as_written_with_the_yaml_kept_under_the_flags(monkeypatch):
    monkeypatch.chdir(ROOT)  # the README's paths are relative to the repository
    commands = readme_recipe_commands()
    assert [c[:2] for c in commands] == [["python", "recipes/finetune.py"], ["accelerate", "launch"]]
    default = finetune.configure(recipe_argv(commands[0]))
    assert (default.model, default.method, default.dataset, default.trainer) == (
        "smollm2",
        "pissa",
        "builtin:arithmetic",
        "transformers",
    )
    accelerate = finetune.configure(recipe_argv(commands[1]))
    assert accelerate.method == "effort" and accelerate.output_dir == "runs/effort"
    assert accelerate.training == {"max_steps": 300, "learning_rate": EFFORT_LR, "per_device_train_batch_size": 8}
    assert accelerate.method_config["residual_rank"] == EFFORT_RANK
    arguments = finetune.training_arguments(accelerate)
    assert (arguments.max_steps, arguments.learning_rate, arguments.per_device_train_batch_size) == (300, EFFORT_LR, 8)
    assert arguments.lr_scheduler_type == "constant"  # the recipe's defaults under the file's block


def test_a_flat_flag_changes_its_key_only():
    recipe = finetune.configure(
        [
            "--config",
            EFFORT,
            "--learning_rate",
            "1e-4",
            "--warmup_steps",
            "5",
            "--method_config",
            "{residual_rank: 2}",
            "--eval_size",
            "8",
        ]
    )
    assert recipe.training == {
        "max_steps": 120,
        "learning_rate": 1e-4,
        "per_device_train_batch_size": 8,
        "warmup_steps": 5,
    }
    assert recipe.method_config == {**EFFORT_YAML["method_config"], "residual_rank": 2}
    assert recipe.eval_size == 8 and recipe.method == "effort"


def test_the_training_mapping_flag_merges_and_later_flags_win():
    recipe = finetune.configure(["--config", EFFORT, "--training", "{max_steps: 50, seed: 3}", "--max_steps", "7"])
    assert recipe.training == {"max_steps": 7, "learning_rate": EFFORT_LR, "per_device_train_batch_size": 8, "seed": 3}
    assert finetune.configure(["--max_steps", "300", "--max_steps", "3"]).training == {"max_steps": 3}
    assert finetune.configure(["--max_steps=4", "--max-steps", "5"]).training == {"max_steps": 5}


@pytest.mark.parametrize(
    "method, quantization", [(m, "none") for m in finetune.METHODS] + [("lora", "4bit"), ("pissa", "4bit")]
)
def test_without_a_learning_rate_the_method_trains_at_its_measured_rate(method, quantization):
    record = finetune.RECORDS[method]
    recipe = finetune.configure(["--method", method, "--quantization", quantization])
    want = record.recipe_learning_rate
    if quantization != "none" and record.recipe_learning_rate_quantized is not None:
        want = record.recipe_learning_rate_quantized
    assert finetune.training_arguments(recipe).learning_rate == want
    flagged = finetune.configure(["--method", method, "--quantization", quantization, "--learning_rate", "0.5"])
    assert finetune.training_arguments(flagged).learning_rate == 0.5


def test_values_are_yaml_and_text_stays_text():
    recipe = finetune.configure(
        [
            "--run_name",
            "2024",
            "--report_to",
            "none",
            "--no_remove_unused_columns",
            "--bf16",
            "--max_grad_norm",
            "0.5",
            "--hub_datasets",
            "me/a",
            "me/b",
            "--push_to_hub",
            '"me/repo"',
            "--resume",
        ]
    )
    assert recipe.training == {
        "run_name": "2024",
        "report_to": "none",
        "remove_unused_columns": False,
        "bf16": True,
        "max_grad_norm": 0.5,
    }
    assert recipe.hub_datasets == ["me/a", "me/b"] and recipe.push_to_hub == "me/repo" and recipe.resume is True


def test_top_level_training_keys_in_the_file_join_its_training_block(tmp_path, capsys):
    config = write(tmp_path / "r.yaml", "method: lora\nmax_steps: 30\ntraining: {learning_rate: 1.0e-3}\n")
    assert finetune.configure(["--config", config]).training == {"learning_rate": 1e-3, "max_steps": 30}
    bad = write(tmp_path / "b.yaml", "method: pissa\n\nlearning_rate: -1.0\n")
    message = error_line(finetune, ["--config", bad] + _rest(tmp_path, "training"), capsys)
    assert message.startswith(f"{bad}:3: training.learning_rate must be a finite number > 0"), message


def test_help_lists_every_recipe_and_training_arguments_flag(capsys):
    from transformers import TrainingArguments

    with pytest.raises(SystemExit) as info:
        finetune.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    names = [f.name for f in dataclasses.fields(finetune.FinetuneRecipe)]
    names += [f.name for f in dataclasses.fields(TrainingArguments) if f.init]
    assert len(names) > 100
    missing = [name for name in names if f"--{name} " not in text and f"--{name}\n" not in text]
    assert missing == []
    assert "the adapter: one of lora, pissa, svfit, flora, effort (default: pissa)" in " ".join(text.split())
    assert "(recipe default: 120)" in text  # max_steps: the recipe's default, not TrainingArguments' -1


def test_help_groups_the_recipe_flags_first_then_training_arguments(capsys):
    with pytest.raises(SystemExit):
        finetune.main(["--help"])
    lines = capsys.readouterr().out.splitlines()
    titles = [line for line in lines if line.endswith(":") and not line.startswith(" ")]
    recipe, training = (
        "recipe (FinetuneRecipe):",
        "training (transformers.TrainingArguments; the YAML file's training: block):",
    )
    assert titles == ["options:", recipe, training]
    flags = [line.split()[0] if line.startswith("  --") else None for line in lines]  # each flag's first line
    recipe_group = range(lines.index(recipe), lines.index(training))
    assert flags.index("--method") in recipe_group and flags.index("--max_steps") > lines.index(training)
    # a name both have (output_dir, seed, push_to_hub) is the recipe's flag, listed once, in the recipe's group
    assert flags.count("--output_dir") == 1 and flags.index("--output_dir") in recipe_group


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["--max_stepz", "3"],
            "--max_stepz: unknown recipe keys ['max_stepz'] (no recipe field or TrainingArguments "
            "field has that name); did you mean --max_steps? fix: rename or remove it",
        ),
        (["--lerning-rate", "3"], "--lerning-rate: unknown recipe keys ['lerning-rate']"),
        (["--epochs", "3"], "did you mean --num_train_epochs?"),
        (["--max_step", "3"], "did you mean --max_steps?"),  # no abbreviations: a prefix is no flag
        (["--eval_size"], "command line: --eval_size has no value; fix: pass --eval_size VALUE"),
        (["stray"], "command line: expected --key value pairs, got 'stray'"),
        (
            ["--learning_rate", "0"],
            "--learning_rate: training.learning_rate must be a finite number > 0, got 0",
        ),
        (["--max_steps", "0"], "--max_steps: training.max_steps must be an integer >= 1"),
        (["--bf16", "maybe"], "--bf16: training.bf16 must be true or false, got 'maybe'"),
        (["--method_config", "{r: [1}"], "--method_config: '{r: [1}' is not a valid YAML value"),
        (["--optim", "sgdd"], "--optim: training: TrainingArguments rejects it"),
        (["--packing", "true"], "--packing: unknown recipe keys ['packing']"),
        (
            ["--trainer", "trl", "--training", "{packin: true}"],
            "--training: unknown key(s) ['packin'] (did you mean ['packing']?); fix: use SFTConfig field names",
        ),
        (
            ["--trainer", "keras"],
            "--trainer: trainer must be one of 'transformers', 'trl', got 'keras'; fix: set trainer to one of them",
        ),
    ],
)
def test_bad_flags_are_one_line_naming_the_flag_before_loading(tmp_path, capsys, argv, expected):
    message = error_line(finetune, argv + _rest(tmp_path, ""), capsys)
    assert expected in message and "fix" in message, message
    assert not (tmp_path / "out").exists()


def test_trl_gets_an_sft_config_with_the_recipe_defaults():
    from trl import SFTConfig

    recipe = finetune.configure(
        ["--config", EFFORT, "--trainer", "trl", "--max_length", "48", "--training", "{packing: false}"]
    )
    arguments = finetune.training_arguments(recipe)
    assert type(arguments) is SFTConfig
    assert (arguments.max_length, arguments.learning_rate, arguments.max_steps) == (48, EFFORT_LR, 120)
    assert (arguments.bf16, arguments.gradient_checkpointing, arguments.packing) == (False, False, False)


# -- quantisation: one object for the model's and the method's side -------------------------------------------------


def test_quantization_spells_the_bitsandbytes_and_qpissa_settings_once():
    import torch

    from subspace_peft.methods import LORA, PISSA, SVFIT

    assert Quantization.names() == ("none", "8bit", "4bit")
    qlora = Quantization("4bit").model_kwargs(LORA, torch.bfloat16)["quantization_config"]
    assert (qlora.load_in_4bit, qlora.load_in_8bit, qlora.bnb_4bit_quant_type) == (True, False, "nf4")
    assert qlora.bnb_4bit_quant_storage == torch.bfloat16
    assert Quantization("8bit").model_kwargs(LORA, torch.float32)["quantization_config"].load_in_8bit
    assert Quantization("4bit").model_kwargs(PISSA, torch.float32) == {}  # QPiSSA quantises after the SVD
    assert Quantization("4bit").method_config_changes(PISSA, "bfloat16", {}) == {
        "residual_quantization": "nf4",
        "residual_quant_iters": 5,
        "residual_quant_storage": "bfloat16",
    }
    assert Quantization("8bit").method_config_changes(PISSA, "float32", {}) == {
        "residual_quantization": "int8",
        "residual_quant_iters": 5,
    }
    assert Quantization("8bit").method_config_changes(PISSA, "float32", {"residual_quant_iters": 1}) == {
        "residual_quantization": "int8"
    }
    assert Quantization("none").method_config_changes(PISSA, "float32", {}) == {}
    assert Quantization("4bit").method_config_changes(LORA, "float32", {}) == {}  # QLoRA quantises on load
    assert Quantization("4bit").model_kwargs(SVFIT, torch.float32) == {}
    config = finetune.peft_config(finetune.FinetuneRecipe(method="pissa", quantization="4bit", dtype="bfloat16"))
    assert (config.residual_quantization, config.residual_quant_storage) == ("nf4", "bfloat16")
    assert config.residual_quant_iters == 5


# -- the Hub fields -------------------------------------------------------------------------------------------------


def test_a_push_from_a_local_model_folder_needs_hub_base_model_before_loading(tmp_path, capsys):
    message = error_line(finetune, ["--push_to_hub", "me/adapter"] + _rest(tmp_path, ""), capsys)
    assert message.startswith(f"--push_to_hub: the model {tmp_path / 'model'} is a local folder"), message
    assert message.endswith("fix: pass --hub_base_model <the Hub id of the model in that folder>")
    assert not (tmp_path / "out").exists()


def test_the_hub_fields_go_to_push_adapter(tmp_path, monkeypatch):
    import subspace_peft

    def push_adapter(model, repo_id, training_summary=None, base_model=None, license=None, datasets=None):
        raise AssertionError("not called here")

    monkeypatch.setattr(subspace_peft, "push_adapter", push_adapter)
    _rest(tmp_path, "")
    recipe = finetune.configure(
        [
            "--model",
            str(tmp_path / "model"),
            "--push_to_hub",
            "me/adapter",
            "--hub_base_model",
            "me/base",
            "--hub_license",
            "apache-2.0",
            "--hub_datasets",
            "me/data",
        ]
    )
    assert finetune.push_arguments(recipe) == {
        "base_model": "me/base",
        "license": "apache-2.0",
        "datasets": ["me/data"],
    }
    smollm2 = finetune.FinetuneRecipe(push_to_hub="me/adapter")
    assert finetune.push_arguments(smollm2) == {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    hub_model = finetune.FinetuneRecipe(model="someone/some-model", push_to_hub="me/adapter")
    assert finetune.push_arguments(hub_model) == {"base_model": "someone/some-model"}

    def old_push_adapter(model, repo_id, training_summary=None):
        raise AssertionError("not called here")

    monkeypatch.setattr(subspace_peft, "push_adapter", old_push_adapter)
    with pytest.raises(RecipeError, match=r"push_adapter takes no \['license'\] argument"):
        finetune.push_arguments(finetune.FinetuneRecipe(push_to_hub="me/adapter", hub_license="mit"))
    assert finetune.push_arguments(smollm2) == {}  # an older push_adapter reads the base model from the config


@pytest.mark.slow  # SmolLM2 through accelerate launch (about a minute on CPU)
def test_the_readme_accelerate_command_runs_as_written(tmp_path):
    from subspace_peft.packaged_models import smollm2_missing

    if smollm2_missing():
        pytest.skip(f"the packaged SmolLM2 is not installed: {smollm2_missing()}")
    command = next(c for c in readme_recipe_commands() if c[0] == "accelerate")
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    argv = [
        accelerate if command[0] == "accelerate" else command[0],
        *command[1:],
        "--max_steps",
        "3",
        "--output_dir",
        str(tmp_path / "run"),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # the appended --max_steps 3 won over the README's 300; effort.yaml's learning rate stayed
    assert (metrics["method"], metrics["trainer"], metrics["steps"], metrics["learning_rate"]) == (
        "effort",
        "transformers",
        3,
        EFFORT_LR,
    )
    assert metrics["after"]["eval_loss"] < metrics["before"]["eval_loss"]
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "EFFORT" and adapter["residual_rank"] == EFFORT_RANK


def test_the_report_says_which_weights_the_adapter_holds_and_how_to_load_it(tmp_path):
    from types import SimpleNamespace

    def trainer(best: bool, checkpoint=None):
        args = SimpleNamespace(load_best_model_at_end=best, metric_for_best_model=None)
        return SimpleNamespace(args=args, state=SimpleNamespace(global_step=120, best_model_checkpoint=checkpoint))

    assert finetune.saved_weights(trainer(False)).startswith("the last step's (step 120;")
    best = finetune.saved_weights(trainer(True, str(tmp_path / "checkpoint-80")))
    assert best == "the best checkpoint by eval loss (checkpoint-80, load_best_model_at_end)"
    metrics = {"before": {"eval_loss": 1.8, "exact_match": 0.0}, "after": {"eval_loss": 0.36, "exact_match": 0.55}}
    for method, first_load_line in (("pissa", "import subspace_peft"), ("lora", "from peft import")):
        recipe = finetune.FinetuneRecipe(method=method, method_config={}, output_dir=str(tmp_path / "run"))
        lines = finetune.report(recipe, trainer(False), metrics).splitlines()
        assert "eval loss:     1.8000 -> 0.3600 (held-out answers)" in lines
        load = lines[lines.index("load it:") + 1 :]
        assert load[0].strip().startswith(first_load_line) and len(load) == (3 if method == "pissa" else 2)
        assert load[-1].strip() == f'model = AutoPeftModelForCausalLM.from_pretrained("{tmp_path / "run" / "adapter"}")'
