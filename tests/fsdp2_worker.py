"""FSDP2 (torch.distributed.fsdp.fully_shard) training of a tiny Llama with one method, on CPU with gloo:

    torchrun --nproc_per_node 2 tests/fsdp2_worker.py METHOD OUT_DIR

Each decoder layer and the whole PeftModel are sharded; 3 AdamW steps on per-rank batches; rank 0 saves the adapter
from the gathered full state dict. Run by tests/test_fsdp2.py.
"""

import sys

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
from peft import get_peft_model  # noqa: E402
from test_fsdp2 import method_config, tiny_llama  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

method, out = sys.argv[1], sys.argv[2]
rank = dist.get_rank()
model = get_peft_model(tiny_llama(), method_config(method))
for layer in model.base_model.model.model.layers:
    fully_shard(layer)
fully_shard(model)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
g = torch.Generator().manual_seed(rank)
model.train()
for step in range(3):
    ids = torch.randint(0, 64, (2, 8), generator=g)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    if method == "effort":  # the regularisers were computed inside each sharded layer's forward, in every pass
        log = model.base_model._regulariser_log
        print("REGULARISER_PASSES", log.passes, sorted(log.sums))
    model.save_pretrained(out, state_dict=sd)
    print("SAVED", method, float(loss.detach()))
# every rank waits for rank 0's save before tearing down: a rank leaving early while another still used gloo
# aborted now and then ("terminate called without an active exception")
dist.barrier()
dist.destroy_process_group()
