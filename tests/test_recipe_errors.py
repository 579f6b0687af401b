"""Every bad recipe input is one line naming the file (and line), the key and the fix, before any model is loaded.

``main()`` prints it as ``error: <message>`` on stderr and exits with status 2; ``run()`` called from Python raises
a ValueError subclass (``RecipeError``). The model loaders are replaced by functions that fail the test, so each
case also shows that nothing was loaded; one end-to-end run shows the resume fallback on a real checkpoint.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_finetune_recipe import METHOD_CONFIGS, RECIPE, recipe_args, tiny_model  # noqa: F401  (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "recipes"))

from subspace_peft.recipe_tools import RecipeError  # noqa: E402

import finetune  # noqa: E402
import merge  # noqa: E402


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    """Any model load fails the test (the one end-to-end test runs the recipe in a child process)."""
    from transformers import PreTrainedModel

    def fail(*args, **kwargs):
        pytest.fail("a model was loaded before the bad input was reported")

    monkeypatch.setattr(finetune, "load_model", fail)
    monkeypatch.setattr(merge, "load_pretrained", fail)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(fail))  # what every auto class calls


def error_line(module, argv: list[str], capsys) -> str:
    """The message ``module.main(argv)`` exits 2 with, checked to be one ``error:`` line on stderr, the last."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], err
    return lines[-1][len("error: ") :]


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def rows(count: int) -> str:
    return "".join(json.dumps({"prompt": f"Question: {i}?\nAnswer:", "answer": f" {i}"}) + "\n" for i in range(count))


# -- the YAML file and the flags -----------------------------------------------------------------------------------


def test_malformed_yaml_names_file_line_and_column(tmp_path, capsys):
    config = write(tmp_path / "bad.yaml", "method: pissa\ntraining: {max_steps: 3\n  learning_rate: [1e-4}\n")
    message = error_line(finetune, ["--config", config], capsys)
    assert message.startswith(f"{config}:3:") and "malformed YAML" in message and "fix" in message
    with pytest.raises(ValueError, match="malformed YAML"):  # from Python: a ValueError subclass
        finetune.configure(["--config", config])


def test_missing_config_file(tmp_path, capsys):
    message = error_line(finetune, ["--config", str(tmp_path / "nope.yaml")], capsys)
    assert "nope.yaml: no such file" in message and "fix" in message


def test_unknown_key_names_its_line_and_the_closest_key(tmp_path, capsys):
    config = write(tmp_path / "r.yaml", "method: lora\neval_sise: 8\n")
    message = error_line(finetune, ["--config", config], capsys)
    assert message.startswith(f"{config}:2:") and "unknown recipe keys ['eval_sise']" in message
    assert "did you mean 'eval_size'" in message and "fix" in message


def test_a_key_set_twice_is_refused(tmp_path, capsys):
    config = write(tmp_path / "r.yaml", "method: lora\neval_size: 8\neval_size: 16\n")
    assert (
        error_line(finetune, ["--config", config], capsys)
        == f"{config}:3: eval_size is set twice (first on line 2); fix: keep one of them"
    )


def test_wrong_type_names_the_line_and_key(tmp_path, capsys):
    config = write(tmp_path / "r.yaml", "method: lora\n\neval_size: abc\n")
    message = error_line(finetune, ["--config", config], capsys)
    assert message.startswith(f"{config}:3:")
    assert "eval_size must be an integer, got 'abc'" in message and "fix: set eval_size to an integer" in message


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("eval_size", "0", "eval_size must be an integer >= 1"),
        ("train_size", "-3", "train_size must be an integer >= 1"),
        ("max_length", "0", "max_length must be an integer >= 1"),
        ("train_size", "2.5", "train_size must be an integer, got 2.5"),
        ("resume", "maybe", "resume must be true or false"),
        ("training", "{learning_rate: 0}", "training.learning_rate must be a finite number > 0, got 0"),
        ("training", "{learning_rate: -1.0e-4}", "training.learning_rate must be a finite number > 0"),
        ("training", "{learning_rate: .nan}", "training.learning_rate is nan, which is not a finite number"),
        # YAML reads nan (no dot) as text, which is no number either
        ("training", "{learning_rate: nan}", "training.learning_rate must be a finite number > 0, got 'nan'"),
        ("training", "{max_steps: 0}", "training.max_steps must be an integer >= 1"),
        (
            "training",
            "{per_device_train_batch_size: 0}",
            "training.per_device_train_batch_size must be an integer >= 1",
        ),
        ("training", "{per_device_eval_batch_size: -1}", "training.per_device_eval_batch_size must be an integer >= 1"),
        ("training", "{max_stepz: 3}", "training: unknown key(s) ['max_stepz'] (did you mean ['max_steps']?)"),
        ("method_config", "{lora_alpha: .inf}", "method_config.lora_alpha is inf, which is not a finite number"),
        ("method", "dora", "method must be one of"),
    ],
)
def test_bad_flag_values_name_the_flag_key_and_fix(tmp_path, capsys, flag, value, expected):
    message = error_line(finetune, [f"--{flag}", value] + _rest(tmp_path, flag), capsys)
    assert message.startswith(f"--{flag}: "), message
    assert expected in message and "fix" in message, message
    assert not (tmp_path / "out").exists()


def _rest(tmp_path, flag: str) -> list[str]:
    """Valid values for the other keys (a tiny folder with a config.json as the model, which nothing loads)."""
    (tmp_path / "model").mkdir(exist_ok=True)
    write(tmp_path / "model" / "config.json", "{}")
    values = {
        "dataset": write(tmp_path / "d.jsonl", rows(100)),
        "train_size": "8",
        "eval_size": "4",
        "model": str(tmp_path / "model"),
        "output_dir": str(tmp_path / "out"),
    }
    return [item for key, value in values.items() if key != flag for item in (f"--{key}", value)]


def test_a_nested_training_key_in_the_file_is_located_on_its_line(tmp_path, capsys):
    config = write(tmp_path / "r.yaml", "method: pissa\ntraining:\n  max_steps: 10\n  learning_rate: 0.0\n")
    message = error_line(finetune, ["--config", config] + _rest(tmp_path, "training"), capsys)
    assert message.startswith(f"{config}:4: training.learning_rate must be a finite number > 0"), message


def test_another_method_without_its_method_config_is_told_to_set_one(tmp_path, capsys):
    message = error_line(finetune, ["--method", "lora"] + _rest(tmp_path, "method"), capsys)
    assert message.startswith("--method: method_config is not set, and the default one is PiSSA's")
    assert "fix: set method_config for lora (see recipes/configs/lora.yaml)" in message


def test_yaml_1e_minus_4_without_a_dot_is_a_number_in_the_file_and_the_flags(tmp_path):
    # PyYAML's YAML 1.1 resolver reads 1e-4 as a string; the recipes' one loader (recipe_tools.RecipeLoader) as a float
    config = write(tmp_path / "r.yaml", "method: lora\ntraining: {learning_rate: 1e-4, weight_decay: .5e-3}\n")
    recipe = finetune.configure(["--config", config, "--method_config", "{lora_alpha: 1E1}", "--max_grad_norm", "2e0"])
    assert recipe.training == {"learning_rate": 1e-4, "weight_decay": 5e-4, "max_grad_norm": 2.0}
    assert recipe.method_config == {"lora_alpha": 10.0}
    assert finetune.training_arguments(recipe).learning_rate == 1e-4


def test_run_from_python_raises_a_value_error_before_loading(tmp_path):
    with pytest.raises(ValueError, match="eval_size must be an integer >= 1") as info:
        finetune.FinetuneRecipe(eval_size=0)
    assert isinstance(info.value, RecipeError)
    _rest(tmp_path, "")
    recipe = finetune.FinetuneRecipe(model=str(tmp_path / "model"), dataset=write(tmp_path / "e.jsonl", ""))
    with pytest.raises(RecipeError, match="holds no rows"):
        finetune.run(recipe)


# -- the data file -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, content, flags, expected",
    [
        ("empty.jsonl", "", [], "dataset {path} holds no rows; fix: add rows"),
        (
            "small.jsonl",
            rows(10),
            [],
            "dataset {path} has 10 rows, fewer than train_size + eval_size = 8 + 4 = 12; "
            "fix: lower them (e.g. --eval_size 2 --train_size 8)",
        ),
        (
            "field.jsonl",
            rows(3) + json.dumps({"prompt": "q"}) + "\n" + rows(20),
            [],
            "{path}:4: the row has no 'answer' field (answer_field)",
        ),
        ("broken.jsonl", rows(2) + '{"prompt": "q", "answer": \n' + rows(20), [], "{path}:3:"),
        (
            "number.jsonl",
            json.dumps({"prompt": "q", "answer": 5}) + "\n" + rows(20),
            [],
            "{path}:1: the row has 5 (int), not text, in its 'answer' field (answer_field); fix:",
        ),
        ("column.csv", "question,answer\n" + "q,a\n" * 20, [], "dataset {path} has no column(s) ['prompt']"),
        ("short.csv", "prompt,answer\nq,a\nq,\n" + "q,a\n" * 20, [], "{path}:3: the row has an empty 'answer' field"),
        ("list.json", json.dumps([{"prompt": "q", "answer": "a"}] * 5), [], "dataset {path} has 5 rows"),
        ("missing.jsonl", None, [], "--dataset: no such file {path}; fix"),
    ],
)
def test_bad_data_files_name_the_file_and_field_before_loading(tmp_path, capsys, name, content, flags, expected):
    path = str(tmp_path / name) if content is None else write(tmp_path / name, content)
    message = error_line(finetune, ["--dataset", path] + _rest(tmp_path, "dataset") + flags, capsys)
    assert expected.format(path=path) in message, message
    assert "fix" in message


def test_eval_size_zero_is_refused_before_the_data_or_model(tmp_path, capsys):
    # it was a ZeroDivisionError after loading the model
    message = error_line(finetune, ["--eval_size", "0"] + _rest(tmp_path, "eval_size"), capsys)
    assert message.startswith("--eval_size: eval_size must be an integer >= 1") and "fix" in message


def test_max_length_that_cuts_off_every_held_out_answer_stops_before_the_model(tiny_model, tmp_path, capsys):
    # needs the tokenizer (loaded before the model), so the tiny model's folder
    args = ["--max_length", "3"] + _rest(tmp_path, "max_length") + ["--model", tiny_model]
    message = error_line(finetune, args, capsys)
    assert message.startswith("--max_length: max_length 3 leaves 4 of 4 held-out examples no answer token")
    assert "fix: set max_length to at least" in message


# -- the Hub repo id -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("repo_id", ["user/bad repo", "a/b/c", "user/x--y"])
def test_push_to_hub_repo_id_is_checked_before_training(tmp_path, capsys, repo_id):
    message = error_line(finetune, ["--push_to_hub", repo_id] + _rest(tmp_path, "push_to_hub"), capsys)
    assert message.startswith(f"--push_to_hub: push_to_hub {repo_id!r} is not a valid Hub repo id")
    assert "fix: set push_to_hub to 'user/name'" in message


def test_push_to_hub_in_the_file_names_its_line(tmp_path, capsys):
    config = write(tmp_path / "r.yaml", "method: lora\npush_to_hub: 'me/my adapter'\n")
    message = error_line(finetune, ["--config", config] + _rest(tmp_path, "push_to_hub"), capsys)
    assert message.startswith(f"{config}:2: push_to_hub 'me/my adapter' is not a valid Hub repo id")


# -- resume: the newest complete checkpoint ------------------------------------------------------------------------


def fake_checkpoint(folder, step: int) -> str:
    """A checkpoint-N folder with the files Trainer writes (small, but each in its real format)."""
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"base_model.model.layer.lora_A.weight": torch.randn(2, 4)}, path / "adapter_model.safetensors")
    write(path / "adapter_config.json", json.dumps({"peft_type": "LORA", "r": 2}))
    torch.save({"state": {0: {"exp_avg": torch.randn(4096)}}, "param_groups": []}, path / "optimizer.pt")
    torch.save({"last_epoch": step}, path / "scheduler.pt")
    torch.save({"cpu": torch.random.get_rng_state()}, path / "rng_state.pth")
    torch.save({"seed": 0}, path / "training_args.bin")
    write(path / "trainer_state.json", json.dumps({"global_step": step, "log_history": []}))
    return str(path)


@pytest.fixture
def no_unpickling(monkeypatch):
    def fail(*args, **kwargs):
        pytest.fail("a checkpoint file was unpickled to check it")

    monkeypatch.setattr(torch, "load", fail)
    monkeypatch.setattr(pickle, "load", fail)
    monkeypatch.setattr(pickle, "loads", fail)


def truncate(path: str, keep: float = 0.5) -> None:
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * keep)])


def corrupt(path: str) -> None:
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: truncate(os.path.join(p, "optimizer.pt")), "optimizer.pt is truncated or corrupt"),
        (lambda p: os.remove(os.path.join(p, "optimizer.pt")), "optimizer.pt is missing"),
        (lambda p: os.remove(os.path.join(p, "scheduler.pt")), "scheduler.pt is missing"),
        (lambda p: os.remove(os.path.join(p, "rng_state.pth")), "rng_state.pth is missing"),
        (lambda p: corrupt(os.path.join(p, "optimizer.pt")), "optimizer.pt is corrupt"),
        (
            lambda p: truncate(os.path.join(p, "adapter_model.safetensors"), 0.9),
            "adapter_model.safetensors is truncated",
        ),
        (lambda p: os.remove(os.path.join(p, "adapter_model.safetensors")), "adapter_model.safetensors is missing"),
        (lambda p: truncate(os.path.join(p, "trainer_state.json")), "trainer_state.json is not valid JSON"),
        (lambda p: os.remove(os.path.join(p, "trainer_state.json")), "trainer_state.json is missing"),
        (lambda p: open(os.path.join(p, "training_args.bin"), "wb").close(), "training_args.bin is empty"),
    ],
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_complete_one(
    tmp_path, capsys, no_unpickling, damage, reason
):
    older, newer = fake_checkpoint(tmp_path, 2), fake_checkpoint(tmp_path, 4)
    fake_checkpoint(tmp_path, 1)
    damage(newer)
    assert finetune.last_complete_checkpoint(str(tmp_path)) == older
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"resume: skipping incomplete checkpoint {newer} ({reason}")
    assert err.endswith(f"resuming from {older}")


def test_a_complete_newest_checkpoint_is_used_silently(tmp_path, capsys, no_unpickling):
    fake_checkpoint(tmp_path, 2)
    newest = fake_checkpoint(tmp_path, 10)
    assert finetune.last_complete_checkpoint(str(tmp_path)) == newest
    assert capsys.readouterr().err == ""


def test_save_only_model_checkpoints_need_no_optimizer(tmp_path, no_unpickling):
    path = fake_checkpoint(tmp_path, 2)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        os.remove(os.path.join(path, name))
    assert finetune.last_complete_checkpoint(str(tmp_path), save_only_model=True) == path


def test_no_complete_checkpoint_is_one_line_before_loading(tmp_path, capsys):
    out = tmp_path / "run"
    truncate(os.path.join(fake_checkpoint(out, 2), "optimizer.pt"))
    os.remove(os.path.join(fake_checkpoint(out, 4), "scheduler.pt"))
    message = error_line(
        finetune, ["--resume", "true"] + _rest(tmp_path, "output_dir") + ["--output_dir", str(out)], capsys
    )
    assert message.startswith(
        f"--resume: no complete checkpoint in {out}: {out}/checkpoint-4 (scheduler.pt is "
        f"missing); {out}/checkpoint-2 (optimizer.pt is truncated or corrupt"
    )
    assert message.endswith("fix: set resume: false to start a new run, or output_dir to the run to continue")


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_resume_without_any_checkpoint_is_one_line_before_loading(tmp_path, capsys, make):
    out = tmp_path / "run"
    if make == "empty":
        out.mkdir()
    config = write(tmp_path / "r.yaml", f"method: lora\nresume: true\noutput_dir: {out}\n")
    message = error_line(finetune, ["--config", config] + _rest(tmp_path, "output_dir"), capsys)
    assert message.startswith(f"{config}:2: resume: {out} ")
    assert ("does not exist" if make == "missing" else "holds no checkpoint-N folder") in message


@pytest.mark.slow  # a multi-process run
def test_resume_falls_back_past_a_truncated_optimizer_and_matches_the_uninterrupted_run(tiny_model, tmp_path):
    """A real run: checkpoint-4 (the newest) gets a truncated optimizer.pt (it was an OSError with no fallback);
    resuming continues from checkpoint-2, says so in one line, and ends with the uninterrupted run's adapter."""
    common = dict(
        method="pissa",
        method_config=METHOD_CONFIGS["pissa"],
        training={
            "max_steps": 4,
            "save_steps": 2,
            "logging_steps": 1,
            "per_device_train_batch_size": 4,
            "disable_tqdm": True,
            "save_total_limit": None,
        },
    )
    out = tmp_path / "run"
    first = subprocess.run(
        [sys.executable, RECIPE, *recipe_args(tiny_model, out, **common)], capture_output=True, text=True, timeout=600
    )
    assert first.returncode == 0, first.stderr[-3000:]
    straight = load_file(out / "adapter" / "adapter_model.safetensors")
    shutil.rmtree(out / "adapter")
    truncate(str(out / "checkpoint-4" / "optimizer.pt"))
    resumed = subprocess.run(
        [sys.executable, RECIPE, *recipe_args(tiny_model, out, resume=True, **common)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    notes = [line for line in resumed.stderr.splitlines() if line.startswith("resume: ")]
    assert notes == [
        f"resume: skipping incomplete checkpoint {out}/checkpoint-4 (optimizer.pt is truncated or "
        f"corrupt (not a readable torch zip archive: File is not a zip file)); resuming from "
        f"{out}/checkpoint-2"
    ], resumed.stderr[-3000:]
    got = load_file(out / "adapter" / "adapter_model.safetensors")
    assert straight.keys() == got.keys()
    for key in straight:
        assert torch.equal(straight[key], got[key]), key


# -- merge.py ------------------------------------------------------------------------------------------------------


@pytest.fixture
def merge_inputs(tmp_path):
    """Folders that look like a base, a fine-tune and an adapter (nothing loads them here) and unlabeled texts."""
    for name, marker in (("base", "config.json"), ("tuned", "config.json"), ("adapter", "adapter_config.json")):
        (tmp_path / name).mkdir()
        write(tmp_path / name / marker, "{}")
    write(tmp_path / "texts.jsonl", json.dumps({"text": "some words"}) + "\n")
    return tmp_path


def merge_config(root, text: str) -> str:
    return write(root / "merge.yaml", f"base: {root / 'base'}\noutput_dir: {root / 'out'}\n" + text)


TASKS = (
    "tasks:\n  - name: a\n    model: {root}/tuned\n    unlabeled: {root}/texts.jsonl\n"
    "  - name: b\n    adapter: {root}/adapter\n    unlabeled: {unlabeled}\n"
)


@pytest.mark.parametrize(
    "text, line, expected",
    [
        (
            "method: ties\ndensity: 0\n",
            4,
            "density must be a finite number in (0, 1], got 0.0; fix: set density",
        ),
        ("method: dare\ndrop_rate: 1.0\n", 4, "drop_rate must be a finite number in [0, 1), got 1.0"),
        ("scaling: .nan\n", 3, "scaling must be a finite number, got nan"),
        ("scaling: abc\n", 3, "scaling must be a number, got 'abc' (str)"),
        ("steps: 0\n", 3, "steps must be an integer >= 1"),
        ("lr: -1.0\n", 3, "lr must be a finite number > 0"),
        ("temperature: 0\n", 3, "temperature must be a finite number > 0"),
        ("batch_size: 0\n", 3, "batch_size must be an integer >= 1"),
        ("final_mask: soft\n", 3, "final_mask must be one of 'sample', 'mean', 'hard', got 'soft'"),
        ("model_class: AutoModelForNothing\n", 3, "model_class 'AutoModelForNothing' is no transformers model class"),
        ("lamda: 0.3\n", 3, "unknown recipe keys ['lamda']"),
        ("method: ties\n  scaling: 0.3\n", 4, "malformed YAML"),
    ],
)
def test_bad_merge_values_name_the_line_key_and_fix(merge_inputs, capsys, text, line, expected):
    config = merge_config(merge_inputs, text + TASKS.format(root=merge_inputs, unlabeled=merge_inputs / "texts.jsonl"))
    message = error_line(merge, ["--config", config], capsys)
    assert message.startswith(f"{config}:{line}:"), message
    assert expected in message and "fix" in message, message
    assert not (merge_inputs / "out").exists()


@pytest.mark.parametrize(
    "damage, line, expected",
    [
        (lambda root: shutil.rmtree(root / "adapter"), 9, "tasks[1].adapter: no folder"),
        (lambda root: os.remove(root / "adapter" / "adapter_config.json"), 9, "adapter has no adapter_config.json"),
        (lambda root: shutil.rmtree(root / "tuned"), 6, "tasks[0].model: no folder"),
        (lambda root: write(root / "tuned" / "config.json", '{"a": 1,\n'), None, "config.json:2:1: not valid JSON"),
        (lambda root: write(root / "texts2.jsonl", ""), 10, "tasks[1].unlabeled: {root}/texts2.jsonl holds no texts"),
        (
            lambda root: write(root / "texts2.jsonl", '{"text": "a"}\n{"text": 3}\n'),
            None,
            "{root}/texts2.jsonl:2: expected a JSON object with a non-empty 'text' string",
        ),
        (
            lambda root: write(root / "texts2.jsonl", '{"text": "a"}\n\n{"text": "b"\n'),
            None,
            "{root}/texts2.jsonl:3:13: not valid JSON",
        ),
        (lambda root: None, 10, "tasks[1].unlabeled: no such file {root}/texts2.jsonl"),
    ],
)
def test_bad_merge_files_name_the_file_and_task_before_loading(merge_inputs, capsys, damage, line, expected):
    root = merge_inputs
    config = merge_config(
        root, "method: concrete_task_arithmetic\n" + TASKS.format(root=root, unlabeled=root / "texts2.jsonl")
    )
    damage(root)
    message = error_line(merge, ["--config", config], capsys)
    if line is not None:
        assert message.startswith(f"{config}:{line}:"), message
    assert expected.format(root=root) in message and "fix" in message, message
    assert not (root / "out").exists()


def test_merge_task_keys_are_checked(merge_inputs, capsys):
    config = merge_config(merge_inputs, f"tasks:\n  - name: a\n    modle: {merge_inputs}/tuned\n")
    message = error_line(merge, ["--config", config], capsys)
    assert message.startswith(f"{config}:4: task 0 (a) has unknown key(s) ['modle']"), message


def test_merge_run_from_python_raises_a_value_error(merge_inputs):
    recipe = merge.MergeRecipe(base=str(merge_inputs / "nowhere" / "base"), tasks=[{"model": str(merge_inputs)}])
    with pytest.raises(ValueError, match="base: no folder") as info:
        merge.run(recipe)
    assert isinstance(info.value, RecipeError)


def test_max_steps_minus_one_means_epochs_as_in_transformers(tmp_path):
    recipe = finetune.FinetuneRecipe(
        output_dir=str(tmp_path / "out"), training={"max_steps": -1, "num_train_epochs": 2}
    )
    arguments = finetune.training_arguments(recipe)
    assert arguments.max_steps == -1 and arguments.num_train_epochs == 2
    with pytest.raises(RecipeError, match=r"training.max_steps must be an integer >= 1.*-1 trains for num_train"):
        finetune.training_arguments(finetune.FinetuneRecipe(output_dir=str(tmp_path / "o"), training={"max_steps": -2}))


@pytest.mark.parametrize("trainer", ["transformers", "trl"])
def test_deepspeed_launch_mixed_precision_reaches_the_training_arguments(tmp_path, monkeypatch, trainer):
    # accelerate launch with deepspeed_zero3.yaml (mixed_precision: bf16) puts bf16 into DeepSpeed's config, and
    # transformers refused TrainingArguments with bf16 false ("ds bf16.enabled=True vs hf bf16=False"; seen on a GPU).
    # bf16 TrainingArguments cannot be built on this CPU-only machine, so the values the recipe adds are checked.
    recipe = finetune.FinetuneRecipe(output_dir=str(tmp_path / "out"), trainer=trainer)
    assert finetune._deepspeed_mixed_precision(recipe) == {}  # no launch: the recipe's own default (bf16 off)
    assert finetune.training_arguments(recipe).bf16 is False
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert finetune._deepspeed_mixed_precision(recipe) == {"bf16": True}
    refused = finetune.FinetuneRecipe(output_dir=str(tmp_path / "o"), trainer=trainer, training={"bf16": False})
    with pytest.raises(RecipeError, match=r"training.bf16 is false.*mixed_precision: bf16.*fix: remove training.bf16"):
        finetune.training_arguments(refused)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert finetune.training_arguments(refused).bf16 is False
