"""Guards for the environments accelerate, bitsandbytes and FSDP set up: each stops (or repairs) a run that would
otherwise train something other than what was asked, quietly."""

from __future__ import annotations

import os
from typing import Optional

from subspace_peft.recipe_tools.config import RecipeError
from subspace_peft.registry import Method


def keep_4bit_layers_on_the_training_path(model) -> None:
    """Stop bitsandbytes' CPU inference path for 4-bit layers, which evaluation would otherwise take.

    bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks a Linear4bit's weight on its first no-grad evaluation
    forward, rounding the block scales to bf16, and ``state_dict()`` (every checkpoint save) unpacks it again without
    restoring them. Measured: the same model's logits moved by 0.02 after a save, and under DDP the rank that saved
    evaluated differently from the others. Kept on the training path, evaluation computes what training does.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def fsdp_storage_mismatch(quantization: str, dtype: str, mixed_precision: str) -> Optional[str]:
    """Why FSDP with this mixed precision would corrupt the recipe's 4-bit base, or None.

    FSDP casts every floating parameter to the mixed-precision dtype before gathering it, the 4-bit data stored as
    floats included: the packed bytes are converted as if they were numbers. Measured (FSDP2 on CPU): float32
    storage under bf16 mixed precision fails inside bitsandbytes with a shape error; bfloat16 storage works.
    """
    wanted = {"bf16": "bfloat16", "fp16": "float16"}.get(mixed_precision)
    if quantization != "4bit" or wanted is None or wanted == dtype:
        return None
    return (
        f"FSDP with mixed_precision {mixed_precision} would cast the 4-bit base, stored as {dtype}, to "
        f"{wanted} and corrupt it: pass --dtype {wanted}"
    )


def check_distribution_took_effect(trainer, quantization: str, dtype: str) -> None:
    """Stop a run whose distribution accelerate quietly changed.

    accelerate 1.x falls back to no distribution when a config asks for FSDP without GPUs (each process then trains
    its own copy) and to DDP when ACCELERATE_USE_CPU=true (measured with recipes/accelerate/fsdp.yaml).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    asked = [kind for kind in ("FSDP", "DEEPSPEED") if os.environ.get(f"ACCELERATE_USE_{kind}", "").lower() == "true"]
    got = str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1]
    mismatch = trainer.is_fsdp_enabled and fsdp_storage_mismatch(
        quantization, dtype, str(trainer.accelerator.mixed_precision)
    )
    if mismatch:
        raise RecipeError(mismatch)
    if trainer.is_fsdp_enabled and not trainer.accelerator.is_fsdp2:
        # FSDP1 inserts wrapper modules, and peft then finds no adapter under their names: it saves an empty adapter
        raise RecipeError(
            "accelerate config: FSDP1 is not supported; fix: set fsdp_version: 2 (recipes/accelerate/fsdp.yaml)"
        )
    if (world_size > 1 and trainer.accelerator.num_processes != world_size) or (asked and asked[0] != got):
        raise RecipeError(
            f"the launch asked for {asked[0] if asked else 'distribution'} over {world_size} "
            f"process(es) but accelerate set up {got} with {trainer.accelerator.num_processes}. FSDP and DeepSpeed "
            "need GPUs; fix: on CPU use DDP: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N "
            "recipes/finetune.py"
        )


def launch_problem(method: Method, quantization: str, env: Optional[dict] = None) -> Optional[str]:
    """Why the accelerate launch's loading settings cannot build or train ``method`` (its record), or None (read
    from the environment ``accelerate launch`` sets; checked before the model is loaded).

    - DeepSpeed ``zero3_init_flag: true`` loads the base partitioned: the SVD methods split their SVDs over the
      ranks, but one that quantises its residual (QPiSSA) replaces each base weight by it and needs every whole
      weight (``method.whole_weights_at_init``).
    - FSDP2 ``fsdp_cpu_ram_efficient_loading: true`` has accelerate (1.15) broadcast rank 0's state dict into the
      sharded model, assuming every entry is a sharded parameter: the frozen factors a method keeps as buffers
      (``method.frozen_buffers``), which FSDP2 does not shard, stop it ("'Tensor' object has no attribute
      'device_mesh'", measured by tests/test_distributed_init.py).
    """
    env = os.environ if env is None else env

    def on(name: str) -> bool:
        return env.get(name, "").lower() == "true"

    zero3_init = on("ACCELERATE_USE_DEEPSPEED") and on("ACCELERATE_DEEPSPEED_ZERO3_INIT")
    if zero3_init and method.whole_weights_at_init and quantization != "none":
        return (
            f"Q{method.title} (method {method.name}, quantization {quantization}) quantises each whole base weight, "
            "but the accelerate config's zero3_init_flag: true loads the base partitioned; fix: set zero3_init_flag: "
            "false in the accelerate config (or train without --quantization)"
        )
    if on("ACCELERATE_USE_FSDP") and on("FSDP_CPU_RAM_EFFICIENT_LOADING") and method.frozen_buffers:
        return (
            f"{method.name} keeps frozen factors as buffers, which accelerate's fsdp_cpu_ram_efficient_loading cannot "
            "broadcast (it expects sharded parameters only); fix: set fsdp_cpu_ram_efficient_loading: false in the "
            "accelerate config (every rank then loads the base; the SVDs are still split across the ranks)"
        )
    return None
