"""Export a subspace adapter as a plain peft LoRA adapter that loads without subspace_peft."""

from __future__ import annotations

import os
import re

import torch
from peft import LoraConfig, get_peft_model_state_dict
from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING
from safetensors.torch import save_file

from .tuners.base import CONV_TYPES, FactorLayer

SAFETENSORS_NAME = "adapter_model.safetensors"


def _lora_weights(layer: FactorLayer, adapter: str):
    """(lora A, lora B, alpha) in peft LoRA's layouts, with alpha / rank * B A equal to the layer's update."""
    a, b, scale = layer.lora_factors(adapter)
    a, b = a.detach(), b.detach()
    if not isinstance(layer.get_base_layer(), torch.nn.Embedding):  # LoRA's embedding factors are plain matrices
        a, b = layer.geometry.factor_weights(a, b)
    return a, b, scale * b.shape[1]


def _lora_keys(module_name: str, layer: FactorLayer) -> tuple[str, str]:
    if isinstance(layer.get_base_layer(), torch.nn.Embedding):
        return f"{module_name}.lora_embedding_A", f"{module_name}.lora_embedding_B"
    return f"{module_name}.lora_A.weight", f"{module_name}.lora_B.weight"


def export_lora(peft_model, out_dir: str | os.PathLike, adapter_name: str = "default") -> LoraConfig:
    """Write ``adapter_name`` of ``peft_model`` to ``out_dir`` as a plain LoRA adapter (peft_type LORA).

    The LoRA adapter loads with vanilla peft onto the ORIGINAL base model and gives the same outputs: each layer's
    update is rewritten exactly, with no truncation (``lora_factors`` of each layer says at which rank; PiSSA: 2r).
    A QPiSSA adapter exports at rank r and belongs on its quantised residual base (``peft_model.get_base_model()``).
    """
    config = peft_model.peft_config[adapter_name]
    bias = getattr(config, "bias", "none")  # a method without a bias option trains none
    if bias != "none":
        raise ValueError(
            f"export_lora writes the adapter's factors only, but this adapter trains biases (bias={bias!r}); "
            "merge it instead (merge_and_unload) or train with bias='none'"
        )
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    prefix = PEFT_TYPE_TO_PREFIX_MAPPING[config.peft_type]
    state = {k: v for k, v in state.items() if f".{prefix}" not in k}
    targets, rank_pattern, alpha_pattern = [], {}, {}
    fan_in_fan_out = False
    base = peft_model.get_base_model()
    for name, module in base.named_modules():
        if not isinstance(module, FactorLayer) or adapter_name not in module.r:
            continue
        a, b, alpha = _lora_weights(module, adapter_name)
        key_a, key_b = _lora_keys(f"base_model.model.{name}", module)
        state[key_a], state[key_b] = a.contiguous(), b.contiguous()
        targets.append(name)
        pattern = f"^{re.escape(name)}$"
        rank_pattern[pattern], alpha_pattern[pattern] = b.shape[1], alpha
        fan_in_fan_out = fan_in_fan_out or getattr(module, "fan_in_fan_out", False)
        if isinstance(module.get_base_layer(), CONV_TYPES) and module.get_base_layer().padding_mode != "zeros":
            raise ValueError(
                f"layer '{name}' uses padding_mode={module.get_base_layer().padding_mode!r}, which "
                "peft's LoRA conv ignores: export would change the outputs"
            )
    if not targets:
        raise ValueError(f"adapter '{adapter_name}' has no layers to export")
    first = rank_pattern[f"^{re.escape(targets[0])}$"]
    lora_config = LoraConfig(
        r=first,
        lora_alpha=alpha_pattern[f"^{re.escape(targets[0])}$"],
        target_modules=targets,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        fan_in_fan_out=fan_in_fan_out,
        modules_to_save=config.modules_to_save,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        init_lora_weights=True,
    )
    os.makedirs(out_dir, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        os.path.join(out_dir, SAFETENSORS_NAME),
        metadata={"format": "pt"},
    )
    lora_config.save_pretrained(str(out_dir))
    return lora_config
