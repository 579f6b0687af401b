"""The SVD init split across 2 ranks (torchrun, gloo, CPU), for several methods in one run:

    torchrun --nproc_per_node 2 tests/distributed_init_worker.py LAYOUT OUT_DIR METHOD...

LAYOUT is how the tiny Llama's base weights are held when get_peft_model runs:

- ``whole``: every rank holds them (DDP, plain torchrun);
- ``zero3``: built under ``deepspeed.zero.Init()`` (accelerate's ``zero3_init_flag: true``) and loaded into the
  partitions as transformers' from_pretrained does (``GatheredParameters(modifier_rank=0)``);
- ``dtensor``: every decoder layer and the model sharded by FSDP2's ``fully_shard`` first;
- ``rank0``: rank 0 holds them, rank 1 builds the model on meta (accelerate's ``fsdp_cpu_ram_efficient_loading``);
  afterwards accelerate's own FSDP2 loading (``fsdp2_load_full_state_dict``) is tried on the adapted model.

Each rank writes OUT_DIR/<method>_rank<r>.safetensors: the adapter's tensors (gathered whole) and the base weights
(gathered whole, under ``base.``), and OUT_DIR/<method>_rank<r>.json (or ``{"refused": message}``): the number of
matrices this rank decomposed, the largest weight made whole at once and the most held at once (elements), and how
many adapter tensors are on meta. Run by tests/test_distributed_init.py, which compares
the files with a one-process init.
"""

import json
import os
import sys
import warnings

import torch

layout, out, methods = sys.argv[1], sys.argv[2], sys.argv[3:]
if layout == "zero3":
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
import torch.distributed as dist  # noqa: E402

if not dist.is_initialized():
    dist.init_process_group("gloo")
from peft import get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from test_distributed_init import init_config  # noqa: E402
from test_fsdp2 import tiny_llama  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import subspace_peft.linalg.svd as svd  # noqa: E402
from subspace_peft.tuners.base import distributed  # noqa: E402

rank = dist.get_rank()
# the adapter containers of every method tested here (a tensor's name: ....<container>.<adapter>.weight)
ADAPTER = {"pissa_A", "pissa_B", "pissa_A0", "pissa_B0", "svfit_delta", "svfit_sigma0", "svfit_U", "svfit_Vh"}
ADAPTER |= {"effort_U", "effort_S", "effort_Vh", "effort_U0", "effort_S0", "effort_Vh0"}
decomposed = []
prepared = {}  # how build_model left the base weights
_batched = svd.truncated_svd_batched


def counting_batched(weights, *args, **kwargs):
    decomposed.extend(tuple(w.shape) for w in weights)
    return _batched(weights, *args, **kwargs)


svd.truncated_svd_batched = counting_batched  # what every truncated SVD of linalg runs


def is_adapter(name: str) -> bool:
    return any(part in ADAPTER for part in name.split("."))


def build_model():
    reference = tiny_llama()
    if layout == "whole":
        return reference
    if layout == "zero3":
        import deepspeed

        # fp32 through a config, as accelerate passes it: deepspeed 0.19.8 ignores zero.Init(dtype=torch.float32) on
        # a CPU that supports bf16 (an operator-precedence slip in Init._set_dtype) and partitions in bf16
        with deepspeed.zero.Init(
            config_dict_or_path={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
        ):
            model = type(reference)(reference.config)
        for name, param in model.named_parameters():
            assert param.shape == (0,) and tuple(param.ds_shape) == tuple(reference.get_parameter(name).shape)
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if rank == 0:
                    param.data.copy_(reference.get_parameter(name))
        prepared["partitioned"] = all(p.shape == (0,) for p in model.parameters())
        return model
    if layout == "dtensor":
        from torch.distributed.fsdp import fully_shard

        for layer in reference.model.layers:
            fully_shard(layer)
        fully_shard(reference)
        prepared["sharded"] = all(isinstance(p, DTensor) for p in reference.parameters())
        return reference
    if layout == "rank0":
        if rank == 0:
            return reference
        with torch.device("meta"):
            return type(reference)(reference.config)
    raise SystemExit(f"unknown layout {layout}")


def accelerate_fsdp2_loading(model):
    """What accelerate's fsdp2_prepare_model does with fsdp_cpu_ram_efficient_loading: take rank 0's state dict, move
    the model to meta, shard it, then broadcast and shard rank 0's tensors (fsdp2_load_full_state_dict); returns the
    loaded model. accelerate 1.15 raises AttributeError ('Tensor' object has no attribute 'device_mesh') on a
    persistent buffer, which FSDP2 leaves unsharded: it expects parameters only; 1.16 broadcasts buffers too."""
    from types import SimpleNamespace

    from accelerate.utils.fsdp_utils import fsdp2_load_full_state_dict
    from torch.distributed.fsdp import fully_shard

    original = model.state_dict()
    model = model.to(torch.device("meta"))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    fsdp2_load_full_state_dict(SimpleNamespace(is_main_process=rank == 0, device=torch.device("cpu")), model, original)
    return model


def train_under_zero3(model) -> dict:
    """One SGD step through DeepSpeed's engine, as accelerate's prepare does after a zero.Init load: the engine takes
    the partitioned base and partitions the (whole) adapter parameters itself."""
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    whole_before = all(not hasattr(p, "ds_id") for p in trainable)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(trainable, lr=0.5), config=config)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(rank))
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    return {
        "adapter_whole_before_engine": whole_before,
        "adapter_partitioned_by_engine": all(p.shape == (0,) for p in trainable),
        "loss": float(loss),
    }


def whole_tensors(model) -> dict:
    """Every adapter tensor and every base weight, whole."""
    tensors = {}
    params = dict(model.named_parameters())
    params.update(model.named_buffers())
    for name, tensor in params.items():
        if layout == "zero3" and hasattr(tensor, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([tensor]):
                whole = tensor.detach().clone()
        elif isinstance(tensor, DTensor):
            whole = tensor.detach().full_tensor()
        else:
            whole = tensor.detach().clone()
        if whole.device.type == "meta":
            continue
        key = name if is_adapter(name) else "base." + name
        tensors[key] = whole.contiguous()
    return tensors


for method in methods:
    decomposed.clear()
    distributed.last_record = None
    model = build_model()
    if method == "mismatch":  # the ranks disagree on the adapter: rank 1 asks for another rank
        config = init_config("pissa")
        config.r += rank
    else:
        config = init_config(method.removesuffix("_opted_out"))
    if method.endswith("_opted_out"):
        os.environ[distributed.ENV_VAR] = "0"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = get_peft_model(model, config)
        prepared["warnings"] = [str(w.message) for w in caught if "sharded by FSDP2" in str(w.message)]
    except ValueError as error:
        untouched = not any(hasattr(m, "base_layer") for m in model.modules())
        with open(os.path.join(out, f"{method}_rank{rank}.json"), "w") as handle:
            json.dump({"method": method, "rank": rank, "refused": str(error), "model_untouched": untouched}, handle)
        continue
    finally:
        os.environ.pop(distributed.ENV_VAR, None)
    record = distributed.last_record
    tensors = [*model.named_parameters(), *model.named_buffers()]
    on_meta = [n for n, t in tensors if t.device.type == "meta" and is_adapter(n)]
    save_file(whole_tensors(model), os.path.join(out, f"{method}_rank{rank}.safetensors"))
    if layout == "zero3" and method == "pissa":
        prepared.update(train_under_zero3(model))
    if layout == "rank0":
        try:
            loaded = accelerate_fsdp2_loading(model)
            prepared["accelerate_loading"] = "ok"
            save_file(whole_tensors(loaded), os.path.join(out, f"{method}_rank{rank}_loaded.safetensors"))
        except AttributeError as error:  # accelerate 1.15 broadcasts parameters only, see the test
            prepared["accelerate_loading"] = str(error)
    result = {
        "method": method,
        "rank": rank,
        "decomposed": len(decomposed),
        "owned": len(record.owned) if record else None,
        "layout": record.layout if record else None,
        "largest_gathered": record.largest_gathered if record else None,
        "held_peak": record.held_peak if record else None,
        "adapters_on_meta": len(on_meta),
        **prepared,
    }
    with open(os.path.join(out, f"{method}_rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
dist.barrier()
if rank == 0:
    print("SAVED", layout, flush=True)
dist.destroy_process_group()
