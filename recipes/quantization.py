"""The recipe's quantisation, spelled once: each setting of ``quantization`` supplies both what loading the model
needs (a method whose record says ``quantized_base="on_load"``, QLoRA: a bitsandbytes config that quantises the base
on load) and what the method config needs (``"residual"``, QPiSSA: the residual quantised after the SVD). Methods
without a ``quantized_base`` take their SVD or their update from the full-precision weights."""

from __future__ import annotations

from enum import Enum
from typing import Optional

from subspace_peft.registry import Method


class Quantization(Enum):
    """``value``: the recipe's spelling; ``bits``: bitsandbytes' load_in_<bits>bit; ``quant_type``: the
    bitsandbytes / QPiSSA data type of the quantised weights."""

    NONE = "none"
    INT8 = "8bit"
    NF4 = "4bit"

    @property
    def bits(self) -> Optional[int]:
        return {"8bit": 8, "4bit": 4}.get(self.value)

    @property
    def quant_type(self) -> Optional[str]:
        return {"8bit": "int8", "4bit": "nf4"}.get(self.value)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)

    def model_kwargs(self, method: Method, dtype) -> dict:
        """from_pretrained's quantisation keyword arguments: QLoRA quantises the base on load; every other case
        (QPiSSA included: it quantises the residual after the SVD) loads full precision."""
        if self is Quantization.NONE or method.quantized_base != "on_load":
            return {}
        from transformers import BitsAndBytesConfig

        return {
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=self.bits == 4,
                load_in_8bit=self.bits == 8,
                bnb_4bit_quant_type=Quantization.NF4.quant_type,
                bnb_4bit_compute_dtype=dtype,
                # 4-bit data stored in the model's dtype: FSDP shards and all-gathers it with the other parameters (and
                # casts nothing when mixed precision uses that dtype); a single process computes the same
                bnb_4bit_quant_storage=dtype,
            )
        }

    def method_config_changes(self, method: Method, dtype_name: str, method_config: dict) -> dict:
        """What the method config gets on top of ``method_config``: QPiSSA's residual quantisation, its
        quantisation/SVD iterations (``QPISSA_RECIPE_ITERS``, the measured setting) and for 4 bits its storage dtype,
        the one FSDP shards in, as for QLoRA above; the last two unless the config sets them."""
        from subspace_peft.methods import QPISSA_RECIPE_ITERS

        if self is Quantization.NONE or method.quantized_base != "residual":
            return {}
        changes = {"residual_quantization": self.quant_type}
        if "residual_quant_iters" not in method_config:
            changes["residual_quant_iters"] = QPISSA_RECIPE_ITERS
        if self.bits == 4 and "residual_quant_storage" not in method_config:
            changes["residual_quant_storage"] = dtype_name
        return changes
