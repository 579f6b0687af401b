"""Export a subspace adapter as a plain peft LoRA adapter that loads without subspace_peft."""

from __future__ import annotations

import os
import re

import torch
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file

from .tuners.pissa.layer import PiSSALayer
from .tuners.targets import CONV_TYPES

SAFETENSORS_NAME = "adapter_model.safetensors"


def _lora_factors(layer: PiSSALayer, adapter: str):
    """(A', B', alpha') with alpha'/r' * B' A' equal to the layer's update.

    PiSSA's update s (B A - B_0 A_0) has rank <= 2r and is written exactly as a LoRA of rank 2r:
    A' = [A; A_0], B' = [B, -B_0], alpha' = s * 2r. A QPiSSA layer's update is s B A (rank r) on the residual base.
    """
    a = layer.pissa_A[adapter].weight.detach()
    b = layer.pissa_B[adapter].weight.detach()
    scaling = layer.scaling[adapter]
    if layer.residual_in_base[adapter]:
        factors = (a, b)
    else:
        a0 = layer.pissa_A0[adapter].weight.detach().to(a.dtype)
        b0 = layer.pissa_B0[adapter].weight.detach().to(b.dtype)
        a_dim = 1 if isinstance(layer.get_base_layer(), torch.nn.Embedding) else 0
        factors = (torch.cat([a, a0], dim=a_dim), torch.cat([b, -b0], dim=1))
    rank = factors[1].shape[1]
    return factors[0], factors[1], scaling * rank


def _lora_keys(module_name: str, layer: PiSSALayer) -> tuple[str, str]:
    if isinstance(layer.get_base_layer(), torch.nn.Embedding):
        return f"{module_name}.lora_embedding_A", f"{module_name}.lora_embedding_B"
    return f"{module_name}.lora_A.weight", f"{module_name}.lora_B.weight"


def export_lora(peft_model, out_dir: str | os.PathLike, adapter_name: str = "default") -> LoraConfig:
    """Write ``adapter_name`` of ``peft_model`` to ``out_dir`` as a plain LoRA adapter (peft_type LORA).

    The LoRA adapter loads with vanilla peft onto the ORIGINAL base model and gives the same outputs: PiSSA's update
    is rewritten exactly, with no truncation, at rank 2r (see ``_lora_factors``). A QPiSSA adapter exports at rank r
    and belongs on its quantised residual base (``peft_model.get_base_model()``).
    """
    config = peft_model.peft_config[adapter_name]
    if config.bias != "none":
        raise ValueError(
            f"export_lora writes the adapter's factors only, but this adapter trains biases (bias={config.bias!r}); "
            "merge it instead (merge_and_unload) or train with bias='none'"
        )
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    state = {k: v for k, v in state.items() if ".pissa_" not in k}
    targets, rank_pattern, alpha_pattern = [], {}, {}
    fan_in_fan_out = False
    base = peft_model.get_base_model()
    for name, module in base.named_modules():
        if not isinstance(module, PiSSALayer) or adapter_name not in module.pissa_A:
            continue
        a, b, alpha = _lora_factors(module, adapter_name)
        key_a, key_b = _lora_keys(f"base_model.model.{name}", module)
        lora_a = a.T if isinstance(module.get_base_layer(), torch.nn.Embedding) else a
        state[key_a], state[key_b] = lora_a.contiguous(), b.contiguous()
        targets.append(name)
        pattern = f"^{re.escape(name)}$"
        rank_pattern[pattern], alpha_pattern[pattern] = b.shape[1], alpha
        fan_in_fan_out = fan_in_fan_out or getattr(module, "fan_in_fan_out", False)
        if isinstance(module.get_base_layer(), CONV_TYPES) and module.get_base_layer().padding_mode != "zeros":
            raise ValueError(f"layer '{name}' uses padding_mode={module.get_base_layer().padding_mode!r}, which "
                             "peft's LoRA conv ignores: export would change the outputs")
    if not targets:
        raise ValueError(f"adapter '{adapter_name}' has no PiSSA layers to export")
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
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out_dir, SAFETENSORS_NAME),
              metadata={"format": "pt"})
    lora_config.save_pretrained(str(out_dir))
    return lora_config
