"""DeepSpeed ZeRO-3 on CPU (DeepSpeed's CPU accelerator, gloo) training a tiny Llama with one method:

    torchrun --nproc_per_node 2 tests/deepspeed_worker.py METHOD OUT_DIR

Every parameter is partitioned (stage3_param_persistence_threshold 0: ZeRO-3 otherwise keeps small ones whole).
3 SGD steps on the global batch of tests/test_deepspeed.py, split between the ranks; rank 0 saves the adapter with
every parameter gathered. Run by tests/test_deepspeed.py, which trains the same steps in one process and compares.
"""

import sys

import deepspeed
import torch

deepspeed.init_distributed(dist_backend="gloo")
import torch.distributed as dist  # noqa: E402
from peft import get_peft_model  # noqa: E402
from test_deepspeed import LR, STEPS, global_batch  # noqa: E402
from test_fsdp2 import method_config, tiny_llama  # noqa: E402

method, out = sys.argv[1], sys.argv[2]
rank, world = dist.get_rank(), dist.get_world_size()
model = get_peft_model(tiny_llama(), method_config(method))
config = {
    "train_micro_batch_size_per_gpu": global_batch(0).shape[0] // world,
    "zero_allow_untested_optimizer": True,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
}
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
layer = next(m for m in model.modules() if hasattr(m, "base_layer"))
partitioned = [None] * world  # gathered so that one rank prints: two ranks' prints interleave in the shared pipe
dist.all_gather_object(partitioned, tuple(layer.get_base_layer().weight.shape) == (0,))
if rank == 0:
    print("PARTITIONED", all(partitioned), flush=True)
for step in range(STEPS):
    ids = global_batch(step).chunk(world)[rank]
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
with deepspeed.zero.GatheredParameters(list(model.parameters())):
    if rank == 0:
        model.save_pretrained(out)
        print("SAVED", method, flush=True)
dist.barrier()
dist.destroy_process_group()
