"""``--trainer trl``: every method trains through TRL's SFTTrainer (a few steps on a tiny Llama, in this process)
with the recipe's tokenised data and labels, and saves its adapter."""

from __future__ import annotations

import json
import os
import sys

import pytest
from test_finetune_recipe import METHOD_CONFIGS, tiny_model  # noqa: F401  (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "recipes"))

import finetune  # noqa: E402


def trl_argv(model: str, out, method: str, *extra: str) -> list[str]:
    return [
        "--model",
        model,
        "--output_dir",
        str(out),
        "--train_size",
        "16",
        "--eval_size",
        "4",
        "--method",
        method,
        "--method_config",
        json.dumps(METHOD_CONFIGS[method]),
        "--trainer",
        "trl",
        "--max_steps",
        "3",
        "--save_steps",
        "3",
        "--logging_steps",
        "1",
        "--per_device_train_batch_size",
        "4",
        "--learning_rate",
        "1e-2",
        "--disable_tqdm",
        "true",
        *extra,
    ]


@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_every_method_trains_through_trl_sft_trainer(tiny_model, tmp_path, method, monkeypatch):  # noqa: F811
    from trl import SFTTrainer

    built = []
    original = finetune.make_trainer
    monkeypatch.setattr(finetune, "make_trainer", lambda *a, **k: built.append(original(*a, **k)) or built[-1])
    metrics = finetune.run(finetune.configure(trl_argv(tiny_model, tmp_path, method)))
    assert type(built[0]) is SFTTrainer and built[0].state.global_step == 3
    assert metrics["trainer"] == "trl" and metrics["after"]["eval_loss"] < metrics["before"]["eval_loss"]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == method.upper()
    state = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert len(logged) == 3 and all("mean_token_accuracy" in entry for entry in logged)  # TRL's own metrics
    if method == "effort":  # the regulariser's callback logs it beside TRL's metrics
        assert all(entry["effort_loss"] >= 0 and "effort_orth" in entry for entry in logged)


def test_trl_keeps_the_recipe_labels(tiny_model, tmp_path, monkeypatch):  # noqa: F811
    # SFTTrainer takes the recipe's tokenised sets as they are: the prompt stays masked (-100) in what it trains on
    built = []
    original = finetune.make_trainer
    monkeypatch.setattr(finetune, "make_trainer", lambda *a, **k: built.append(original(*a, **k)) or built[-1])
    argv = trl_argv(tiny_model, tmp_path, "lora", "--max_steps", "1", "--save_steps", "1")
    finetune.run(finetune.configure(argv))
    trainer = built[0]
    batch = next(iter(trainer.get_train_dataloader()))
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        answer = labels != -100
        assert 0 < int(answer.sum()) < int((ids != trainer.processing_class.pad_token_id).sum())
        assert (ids[answer] == labels[answer]).all()
