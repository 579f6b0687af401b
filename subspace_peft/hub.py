"""Adapters on the Hub: a model card that says what the adapter is and how to load it, and a push helper."""

from __future__ import annotations

import os
import tempfile
from typing import Optional

from huggingface_hub import HfApi, ModelCard, ModelCardData

DISPLAY_NAMES = {"PISSA": "PiSSA", "SVFIT": "SVFit", "FLORA": "FLoRA", "EFFORT": "Effort", "LORA": "LoRA"}
# Config fields that describe an adapter's size, per method, in the order a reader wants them.
_SIZE_FIELDS = ("r", "lora_alpha", "residual_rank", "energy", "conv_ranks", "scale", "rank_pattern", "alpha_pattern",
                "init", "residual_quantization", "orth_weight", "norm_weight")


def _config_lines(config) -> list[str]:
    lines = []
    for name in _SIZE_FIELDS:
        value = getattr(config, name, None)
        if value not in (None, {}, [], ()):
            lines.append(f"- `{name}`: `{value}`")
    targets = config.target_modules
    targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
    lines.append(f"- `target_modules`: `{targets}`")
    return lines


def model_card(peft_model, repo_id: str, adapter_name: str = "default", training_summary: Optional[dict] = None) -> str:
    """The README.md of an adapter: YAML metadata (library_name peft, base_model, tags naming the method) and a body
    with the method, its ranks, the trainable parameters, a training summary and the exact code that loads it."""
    config = peft_model.peft_config[adapter_name]
    method = config.peft_type.value if hasattr(config.peft_type, "value") else str(config.peft_type)
    base = config.base_model_name_or_path
    trainable, total = peft_model.get_nb_trainable_parameters()
    ours = method != "LORA"
    data = ModelCardData(library_name="peft", base_model=base or None,
                         tags=["peft", method.lower()] + (["subspace-peft"] if ours else []))
    base_line = f'"{base}"' if base else '"<the base model this adapter was trained on>"'
    model_class = "AutoModelForCausalLM" if str(getattr(config, "task_type", "")) in ("CAUSAL_LM", "TaskType.CAUSAL_LM") \
        else "AutoModel"
    register = f"import subspace_peft  # registers {method} with peft; without it peft fails with KeyError: '{method}'"
    load = [register] if ours else []
    load += [
        "from peft import PeftModel",
        f"from transformers import {model_class}",
        "",
        f"base = {model_class}.from_pretrained({base_line})",
        f'model = PeftModel.from_pretrained(base, "{repo_id}")',
    ]
    name = DISPLAY_NAMES.get(method, method)
    body = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A {name} adapter{f' for `{base}`' if base else ''}"
        + (", made with [subspace-peft](https://pypi.org/project/subspace-peft/)." if ours else "."),
        "",
        "## Adapter",
        "",
        f"- method: {name} (peft_type `{method}`)",
        *_config_lines(config),
        f"- trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)",
        "",
    ]
    if training_summary:
        body += ["## Training", "", "| | |", "|---|---|"]
        body += [f"| {key} | {value} |" for key, value in training_summary.items()]
        body.append("")
    body += ["## How to load", "", "```bash", "pip install subspace-peft" if ours else "pip install peft", "```", "",
             "```python", *load, "```", ""]
    if ours:
        body += ["`import subspace_peft` must run before loading: peft has no plugin discovery, and the adapter's "
                 f"`adapter_config.json` names the `{method}` type that the package registers. To use the adapter "
                 "without this package, export it as plain LoRA first with `subspace_peft.export_lora(model, dir)`.",
                 ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)).content


def push_adapter(
    peft_model, repo_id: str, adapter_name: str = "default", training_summary: Optional[dict] = None,
    private: bool = False, token: Optional[str] = None, commit_message: str = "Upload adapter",
) -> str:
    """Save ``adapter_name`` (safetensors) with :func:`model_card` as README.md and push it to ``repo_id``; returns
    the commit URL. The Hub endpoint is ``HF_ENDPOINT`` as for every huggingface_hub call."""
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        peft_model.save_pretrained(folder, selected_adapters=[adapter_name])
        source = folder if adapter_name == "default" else os.path.join(folder, adapter_name)
        with open(os.path.join(source, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(model_card(peft_model, repo_id, adapter_name, training_summary))
        info = api.upload_folder(repo_id=repo_id, folder_path=source, commit_message=commit_message)
    return str(info)
