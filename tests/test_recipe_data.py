"""The recipe's data (recipes/data.py): prompt/answer and chat rows tokenised with ``Dataset.map`` (loss on the
answer, or on the assistant turns only), batched with ``DataCollatorForSeq2Seq``; a chat run on a tiny model with
SmolLM2's tokenizer (its chat template)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from test_finetune_recipe import tiny_model  # noqa: F401  (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "recipes"))

from subspace_peft.packaged_models import smollm2_missing  # noqa: E402
from subspace_peft.recipe_tools import RecipeError  # noqa: E402

import finetune  # noqa: E402
from data import arithmetic_chat_rows, chat_segments, collate, tokenize  # noqa: E402

CONVERSATION = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 10 + 4?"},
    {"role": "assistant", "content": "14"},
]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    if smollm2_missing():
        pytest.skip(f"the packaged SmolLM2 is not installed: {smollm2_missing()}")
    from transformers import AutoTokenizer

    from subspace_peft.packaged_models import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path())


def test_prompt_answer_rows_are_tokenised_with_dataset_map_and_loss_on_the_answer(tiny_model):  # noqa: F811
    from datasets import Dataset

    tokenizer = finetune.load_tokenizer(finetune.FinetuneRecipe(model=tiny_model))  # a BERT tokenizer: eos = [SEP]
    rows = [{"prompt": "what is two plus two", "answer": " four"}, {"prompt": "hi", "answer": " hello there"}]
    data = tokenize(rows, tokenizer, 64)
    assert isinstance(data, Dataset) and data.column_names == ["input_ids", "labels", "answer_length", "full_length"]
    prompt = tokenizer("what is two plus two", add_special_tokens=False)["input_ids"]
    answer = tokenizer(" four", add_special_tokens=False)["input_ids"]
    assert data[0]["input_ids"] == prompt + answer + [tokenizer.sep_token_id]
    assert data[0]["labels"] == [-100] * len(prompt) + answer + [tokenizer.sep_token_id]
    assert data[0]["answer_length"] == len(answer)
    cut = tokenize(rows, tokenizer, len(prompt) + 1)[0]  # max_length keeps the prompt and one answer token
    assert cut["answer_length"] == 1 and cut["full_length"] == len(prompt) + len(answer) + 1

    batch = collate(tokenizer)(list(data))
    width = max(len(e["input_ids"]) for e in data)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    short = len(data[1]["input_ids"])
    assert batch["labels"][1, short:].tolist() == [-100] * (width - short)
    assert batch["input_ids"][1, short:].tolist() == [tokenizer.pad_token_id] * (width - short)
    assert batch["attention_mask"][1].tolist() == [1] * short + [0] * (width - short)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}  # answer_length never reaches the model


def test_chat_rows_train_on_the_assistant_turns_only(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    example = tokenize([{"messages": CONVERSATION}], tokenizer, 512)[0]
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    # cutting the rendering turn by turn tokenises it exactly as a whole
    assert example["input_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
    assert tokenizer.decode(trained) == "5<|im_end|>\n14<|im_end|>\n"
    assert example["answer_length"] == len(trained)
    untrained = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label == -100])
    assert "What is 2 + 3?" in untrained and "You add numbers." in untrained and "<|im_start|>assistant\n" in untrained
    assert [text for text, trained in chat_segments(CONVERSATION, tokenizer) if trained] == [
        "5<|im_end|>\n",
        "14<|im_end|>\n",
    ]


def test_chat_data_needs_a_chat_template(tiny_model):  # noqa: F811
    from transformers import AutoTokenizer

    with pytest.raises(RecipeError, match="the model's tokenizer has no chat template"):
        tokenize([{"messages": CONVERSATION}], AutoTokenizer.from_pretrained(tiny_model), 64)


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"messages": [{"role": "user", "content": "q"}]}, "has no assistant turn"),
        ({"messages": [{"role": "bot", "content": "a"}]}, "message 0 of 'messages' is"),
        ({"messages": "hello"}, "is str, not a conversation"),
    ],
)
def test_bad_chat_rows_name_the_line(tmp_path, row, expected):
    good = json.dumps({"messages": CONVERSATION[1:3]})
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join([good, good, json.dumps(row)] + [good] * 10) + "\n")
    recipe = finetune.FinetuneRecipe(dataset=str(path), train_size=4, eval_size=2)
    with pytest.raises(RecipeError) as info:
        finetune.load_rows(recipe)
    assert str(info.value).startswith(f"{path}:3: ") and expected in str(info.value) and "fix" in str(info.value)


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory, smollm2_tokenizer):
    """A two-layer Llama of width 16 with SmolLM2's tokenizer (and so its chat template)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("chat") / "llama"
    tokenizer = smollm2_tokenizer
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("source", ["builtin:arithmetic-chat", "file"])
def test_a_chat_run_trains_on_the_assistant_turns(tiny_chat_model, tmp_path, source):
    dataset = source
    if source == "file":
        dataset = str(tmp_path / "chat.jsonl")
        with open(dataset, "w") as handle:
            for row in arithmetic_chat_rows(40, 3):
                handle.write(
                    json.dumps({"conversation": [{"role": "system", "content": "Add."}, *row["messages"]]}) + "\n"
                )
    recipe = finetune.configure(
        [
            "--model",
            tiny_chat_model,
            "--dataset",
            dataset,
            "--messages_field",
            "conversation" if source == "file" else "messages",
            "--train_size",
            "32",
            "--eval_size",
            "4",
            "--max_length",
            "96",
            "--method",
            "lora",
            "--method_config",
            "{r: 2, target_modules: all-linear}",
            "--max_steps",
            "3",
            "--learning_rate",
            "1e-2",
            "--save_steps",
            "3",
            "--per_device_train_batch_size",
            "4",
            "--disable_tqdm",
            "true",
            "--output_dir",
            str(tmp_path / "run"),
        ]
    )
    metrics = finetune.run(recipe)
    assert metrics["after"]["eval_loss"] < metrics["before"]["eval_loss"]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
