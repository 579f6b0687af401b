"""QPiSSA: the frozen residual ``W - s B_0 A_0`` quantised by bitsandbytes (Meng et al., section 4.3)."""

from __future__ import annotations

import torch
from torch import nn

QUANT_KINDS = ("nf4", "fp4", "int8")


def require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ValueError(
            "residual_quantization needs bitsandbytes: pip install 'subspace-peft[quant]' (or bitsandbytes)"
        ) from error


def quantize_residual(linear: nn.Linear, residual: torch.Tensor, kind: str, storage: str | None = None) -> nn.Module:
    """A bitsandbytes Linear holding ``Q(residual)`` and sharing ``linear``'s bias; ``linear`` is left untouched.
    ``storage`` names the dtype 4-bit data is stored in (None: uint8)."""
    import bitsandbytes as bnb

    device, dtype = linear.weight.device, linear.weight.dtype
    has_bias = linear.bias is not None
    residual = residual.to(dtype).contiguous()
    if kind in ("nf4", "fp4"):
        quant_storage = getattr(torch, storage or "uint8")
        quantized = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=dtype,
            quant_type=kind,
            quant_storage=quant_storage,
            device="meta",
        )
        # module=: bitsandbytes then keeps the quant state on the layer too, and restores it from there when FSDP
        # has replaced the weight by a plain tensor view
        quantized.weight = bnb.nn.Params4bit(
            residual.cpu(), requires_grad=False, quant_type=kind, quant_storage=quant_storage, module=quantized
        )
    elif kind == "int8":
        quantized = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            has_fp16_weights=False,
            threshold=0.0,
            device="meta",
        )
        quantized.weight = bnb.nn.Int8Params(residual.cpu(), requires_grad=False, has_fp16_weights=False)
    else:
        raise ValueError(f"residual_quantization must be one of {QUANT_KINDS}, got {kind!r}")
    if has_bias:
        quantized.bias = linear.bias
    # moving the Params to a device is what quantises them in bitsandbytes
    return quantized.to(device)


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The weight a (possibly bitsandbytes) Linear computes with, as a dense fp32 tensor."""
    from peft.utils.integrations import dequantize_bnb_weight

    weight = module.weight
    # 4-bit data stored in a float dtype (quant_storage=float32 under FSDP) is packed, not a weight: its quant_state
    # says so
    if weight.dtype.is_floating_point and getattr(weight, "quant_state", None) is None:
        return weight.detach().float()
    return dequantize_bnb_weight(weight, state=getattr(module, "state", None)).float()
