"""FSDP2 (fully_shard) over a 4-bit base on CPU with gloo, built the way recipes/finetune.py builds it:

    torchrun --nproc_per_node 2 tests/fsdp_quantized_worker.py METHOD MODEL_DIR OUT_DIR [DTYPE [MIXED_PRECISION]]

METHOD is "lora" (QLoRA: the base quantised on load) or "pissa" (QPiSSA: the residual quantised by the tuner), both
nf4 stored in the model's DTYPE (float32 by default), the dtype the other parameters are sharded in;
MIXED_PRECISION ("bf16") shards with that FSDP2 mixed-precision policy. Each decoder layer and the whole PeftModel are
sharded; 3 AdamW steps on per-rank batches; rank 0 saves the adapter from the gathered full state dict and the
sharded model's logits on a fixed input. Run by tests/test_fsdp_quantized.py.
"""

import os
import sys

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes"))
from peft import get_peft_model  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: E402

from finetune import FinetuneRecipe, keep_4bit_layers_on_the_training_path, load_model, peft_config  # noqa: E402

method, model_dir, out = sys.argv[1:4]
dtype = sys.argv[4] if len(sys.argv) > 4 else "float32"
policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if sys.argv[5:] == ["bf16"] else MixedPrecisionPolicy()
rank = dist.get_rank()
recipe = FinetuneRecipe(
    model=model_dir,
    method=method,
    quantization="4bit",
    output_dir=out,
    dtype=dtype,
    method_config={"r": 2, "lora_alpha": 2, "target_modules": "all-linear"},
)
base, _ = load_model(recipe)
model = get_peft_model(base, peft_config(recipe))
keep_4bit_layers_on_the_training_path(model)
quantized = [m.weight for m in model.modules() if type(m).__name__ == "Linear4bit"]
total = sum(w.numel() for w in quantized)
for layer in model.base_model.model.model.layers:
    fully_shard(layer, mp_policy=policy)
fully_shard(model, mp_policy=policy)
quantized = [m.weight for m in model.modules() if type(m).__name__ == "Linear4bit"]
held = [None] * dist.get_world_size()  # gathered so that one rank prints: two ranks' prints interleave in the pipe
dist.all_gather_object(held, sum(w.to_local().numel() for w in quantized) / total)
if rank == 0:
    print("".join(f"RANK {r} HOLDS {share:.3f} OF THE 4-BIT WEIGHTS\n" for r, share in enumerate(held)), flush=True)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
generator = torch.Generator().manual_seed(rank)
model.train()
for step in range(3):
    ids = torch.randint(0, 64, (2, 8), generator=generator)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
model.eval()
probe = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    logits = model(input_ids=probe).logits
if rank == 0:
    model.save_pretrained(out, state_dict=state_dict)
    torch.save({"probe": probe, "logits": logits}, os.path.join(out, "probe.pt"))
    print("SAVED", method, flush=True)
dist.barrier()  # see fsdp2_worker.py
dist.destroy_process_group()
