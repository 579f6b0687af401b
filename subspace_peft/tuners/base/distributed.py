"""The SVD init split across the ranks of a ``torch.distributed`` job (torchrun, accelerate launch).

When a process group of N > 1 ranks exists at ``get_peft_model`` time, every rank plans the same targets (SPMD: all
ranks build the adapter, in the same order); the targets are split among the ranks by cost (greedy on
``m * n * min(m, n)``, the same on every rank), each rank decomposes only its share, and each owner broadcasts its
fp32 factors, so every rank ends with the adapters a one-process init gives. ``SUBSPACE_PEFT_DISTRIBUTED_INIT=0``
turns this off (every rank then decomposes every target itself, as before; whole weights only).

The base weights may be held four ways when the adapter is built (the same way on every rank, except the last):

- ``whole``: every rank holds every weight (DDP, plain torchrun). Each rank decomposes its share, batched and cached.
- ``zero3``: DeepSpeed ZeRO-3 partitioned them (``zero.Init``, accelerate's ``zero3_init_flag: true``).
- ``dtensor``: FSDP2 sharded them (``fully_shard`` before ``get_peft_model``).
- ``rank0``: rank 0 holds them, the others hold them on the meta device (accelerate's FSDP2
  ``fsdp_cpu_ram_efficient_loading: true``; accelerate later broadcasts rank 0's whole state dict, adapters included).

In the last three, weights are made whole one at a time, in rounds: each round every rank takes part in making whole
one weight per owner (``GatheredParameters``, ``full_tensor()`` or a send from rank 0, all collective and in the same
order), keeps only its own, decomposes it, and lets it go. No rank holds more than one whole weight beyond its own
storage. The tuners never write the base weight at init (PiSSA keeps its principal part as frozen factors), so the
partitions and shards stay as they are.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ...linalg.svd import singular_values, truncated_svds
from .geometry import as_matrix, full_shape, matrix_shape, weight_matrix

ENV_VAR = "SUBSPACE_PEFT_DISTRIBUTED_INIT"
LAYOUTS = ("whole", "zero3", "dtensor", "meta", "mixed")


@dataclass
class InitRecord:
    """What the last distributed SVD init did on this rank (read by the tests; handy in logs)."""

    rank: int
    world_size: int
    layout: str
    owned: list[str] = field(default_factory=list)  # the targets this rank decomposed, in order
    largest_gathered: int = 0  # elements of the largest weight made whole at once (on any rank's request)
    held_peak: int = 0  # most elements of whole weights this rank held at once outside the model's own storage


last_record: Optional[InitRecord] = None


def weight_layout(weight: torch.Tensor) -> str:
    """How this rank holds ``weight``: ``whole``, ``zero3`` (partitioned), ``dtensor`` (sharded) or ``meta``."""
    from torch.distributed.tensor import DTensor

    if hasattr(weight, "ds_id"):
        return "zero3"
    if isinstance(weight, DTensor):
        return "dtensor"
    if weight.device.type == "meta":
        return "meta"
    return "whole"


def world_size() -> int:
    """The size of the default process group (1 without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def opted_out() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off")


def initial_svds(
    bases: dict[str, nn.Module],
    ranks: dict[str, int],
    settings,
    cache,
    desc: str,
    method: str,
    whole_only: Optional[str] = None,
    collective: bool = True,
    before_compute=None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The truncated SVD ``(U, S, Vh)`` of every base layer's weight matrix, split across ranks where a process group
    exists (and ``collective``). ``whole_only``: why this init needs whole weights on every rank (QPiSSA), or None.
    ``before_compute``: see :func:`~subspace_peft.linalg.svd.truncated_svds` (one process only: a check that raised on
    one rank of a split init would leave the others waiting)."""
    if before_compute is not None and collective and world_size() > 1 and not opted_out():
        raise ValueError("before_compute checks run in one process only; check the weights before a split init")

    def decompose(weights: dict[str, torch.Tensor]) -> dict[str, tuple]:
        ranks_of = {key: ranks[key] for key in weights}
        return truncated_svds(weights, ranks_of, settings, cache, desc=desc, before_compute=before_compute)

    outputs = {}
    for key, base in bases.items():
        (m, n), r = matrix_shape(base), ranks[key]
        outputs[key] = [(m, r), (r,), (r, n)]
    tag = f"svd {settings.key()}"
    return _computed(bases, outputs, decompose, method, tag, whole_only, collective)


def singular_value_spectra(bases: dict[str, nn.Module], method: str) -> dict[str, torch.Tensor]:
    """Every singular value (descending, fp32) of every base layer's weight matrix, split across ranks as
    :func:`initial_svds` is (SVFit's ``energy`` ranks)."""

    def spectra(weights: dict[str, torch.Tensor]) -> dict[str, tuple]:
        return {key: (singular_values(weight),) for key, weight in weights.items()}

    outputs = {key: [(min(matrix_shape(base)),)] for key, base in bases.items()}
    return {key: values[0] for key, values in _computed(bases, outputs, spectra, method, "spectra").items()}


def _computed(bases, outputs, compute, method: str, tag: str, whole_only=None, collective: bool = True) -> dict:
    """``compute`` (whole weight matrices by key -> fp32 tensors by key, shaped as ``outputs`` says) of every base
    layer, on this rank alone or split across the ranks of the process group."""
    global last_record
    layouts = {weight_layout(base.weight) for base in bases.values()}
    local = layouts.pop() if len(layouts) == 1 else "mixed"
    size = world_size()
    running = torch.distributed.is_available() and torch.distributed.is_initialized()
    # a one-process job (accelerate launch --num_processes 1 with ZeRO-3 or FSDP2) still has partitioned weights to
    # gather: the split path does that, with this rank owning every layer
    partitioned_alone = size == 1 and running and local in ("zero3", "dtensor")
    if (size == 1 and not partitioned_alone) or not collective or opted_out():
        if local in ("zero3", "dtensor", "mixed"):
            why = (
                f"{ENV_VAR}=0 turned the split init off"
                if running and opted_out()
                else "no torch.distributed process group is running"
                if not running
                else "this init runs on one rank alone"
            )
            raise ValueError(
                f"{method} init needs the whole base weights, but they are {_describe(local)} and {why}. Fix: build "
                f"the adapter on every rank of the job (all ranks call get_peft_model) with {ENV_VAR} unset, or "
                "load the base model unpartitioned (zero3_init_flag: false; fully_shard after get_peft_model)"
            )
        return compute({key: weight_matrix(base) for key, base in bases.items()})

    dist = torch.distributed
    rank, device = dist.get_rank(), _comm_device()
    shapes = {key: matrix_shape(base) for key, base in bases.items()}
    layout = _agree(_plan_digest(shapes, outputs, tag, method), local, method, device)
    if whole_only and layout != "whole":
        raise ValueError(f"the base weights are {_describe(layout)}, but {whole_only}")
    if layout == "dtensor":
        warnings.warn(
            f"{method}: the base model was sharded by FSDP2 before get_peft_model; the adapter's new parameters are "
            "not managed by that fully_shard, so nothing averages their gradients across ranks and the ranks' "
            "adapters drift apart in training. Fix: build the adapter first and shard after get_peft_model (what "
            "accelerate does)",
            stacklevel=2,
        )
    owners = _assign(shapes, size)
    mine = owners[rank]
    record = InitRecord(rank, size, layout, owned=list(mine))
    results: dict[str, tuple] = {}
    if layout == "whole":
        results.update(compute({key: weight_matrix(bases[key]) for key in mine}) if mine else {})
    else:
        fetch = {"zero3": _fetch_zero3, "dtensor": _fetch_dtensor, "rank0": _fetch_from_rank0}[layout]
        for index in range(max(len(keys) for keys in owners)):
            round_keys = [(owner, keys[index]) for owner, keys in enumerate(owners) if index < len(keys)]
            held = {}
            for owner, key in round_keys:
                weight = fetch(bases[key], owner, rank, device)
                record.largest_gathered = max(record.largest_gathered, _elements(shapes[key]))
                if weight is not None:
                    held[key] = weight
            record.held_peak = max(record.held_peak, sum(w.numel() for w in held.values()))
            if held:
                results.update(compute(held))
            del held
    results = _exchange(results, owners, outputs, rank, device)
    last_record = record
    return results


def _describe(layout: str) -> str:
    return {
        "zero3": "partitioned by DeepSpeed ZeRO-3",
        "dtensor": "sharded by FSDP2 (DTensor)",
        "meta": "on the meta device",
        "rank0": "held by rank 0 only (meta on the other ranks: accelerate's fsdp_cpu_ram_efficient_loading)",
        "mixed": "held in more than one way (some whole, some partitioned, sharded or on meta)",
    }.get(layout, layout)


def _comm_device() -> torch.device:
    """Where tensors for the default group's collectives live: the current GPU for nccl, the CPU otherwise."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _plan_digest(shapes: dict, outputs: dict, tag: str, method: str) -> int:
    text = repr((method, tag, [(key, tuple(shapes[key]), outputs[key]) for key in shapes]))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")


def _agree(digest: int, local: str, method: str, device) -> str:
    """The layout all ranks share (``rank0``: whole on rank 0, meta elsewhere). Raises the same ValueError on every
    rank if the ranks planned different targets, ranks or settings, or hold the weights in incompatible ways."""
    dist = torch.distributed
    mine = torch.tensor([digest, LAYOUTS.index(local)], device=device)
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    digests = [int(t[0]) for t in gathered]
    layouts = [LAYOUTS[int(t[1])] for t in gathered]
    if len(set(digests)) > 1:
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        raise ValueError(
            f"{method} init: the ranks of this torch.distributed job planned different adapters (ranks {differ} differ "
            "from rank 0 in the targeted layers, their shapes, ranks or SVD settings). Every rank must build the same "
            "adapter on the same model: pass the same config and base model on all ranks, or set "
            f"{ENV_VAR}=0 to let each rank decompose its own targets"
        )
    if len(set(layouts)) == 1 and layouts[0] in ("whole", "zero3", "dtensor"):
        return layouts[0]
    if layouts[0] == "whole" and all(layout == "meta" for layout in layouts[1:]):
        return "rank0"
    raise ValueError(
        f"{method} init: the base weights are held as {dict(enumerate(layouts))} per rank; the split SVD init takes "
        "whole weights on every rank, ZeRO-3 partitioned or FSDP2-sharded weights on every rank, or whole weights on "
        "rank 0 with meta weights on the others. Load the base model the same way on every rank"
    )


def _cost(shape) -> int:
    m, n = shape
    return m * n * min(m, n)


def _elements(shape) -> int:
    return shape[0] * shape[1]


def _assign(shapes: dict[str, tuple[int, int]], size: int) -> list[list[str]]:
    """Per rank, the targets it decomposes: largest cost first, each to the least-loaded rank (lowest rank on ties).
    Deterministic: the same on every rank."""
    keys = list(shapes)
    costs = [_cost(shapes[key]) for key in keys]
    loads, owners = [0] * size, [[] for _ in range(size)]
    for i in sorted(range(len(keys)), key=lambda i: -costs[i]):  # stable: equal costs keep the model's order
        owner = min(range(size), key=lambda r: (loads[r], r))
        loads[owner] += costs[i]
        owners[owner].append(keys[i])
    return owners


def _fetch_zero3(base: nn.Module, owner: int, rank: int, device) -> Optional[torch.Tensor]:
    """Collective: every rank gathers the partitioned weight; the owner keeps a copy of its matrix."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([base.weight]):
        return weight_matrix(base).detach().clone() if rank == owner else None


def _fetch_dtensor(base: nn.Module, owner: int, rank: int, device) -> Optional[torch.Tensor]:
    """Collective: every rank all-gathers the sharded weight; the owner keeps its matrix."""
    whole = base.weight.detach().full_tensor()
    return as_matrix(base, whole) if rank == owner else None


def _fetch_from_rank0(base: nn.Module, owner: int, rank: int, device) -> Optional[torch.Tensor]:
    """Rank 0 sends its whole weight to the owner (the other ranks hold it on meta)."""
    if owner == 0:
        return weight_matrix(base) if rank == 0 else None
    if rank == 0:
        torch.distributed.send(base.weight.detach().contiguous().to(device), dst=owner)
        return None
    if rank == owner:
        whole = torch.empty(full_shape(base.weight), dtype=base.weight.dtype, device=device)
        torch.distributed.recv(whole, src=0)
        return as_matrix(base, whole)
    return None


def _exchange(results: dict, owners: list[list[str]], outputs: dict, rank: int, device) -> dict:
    """Every target's fp32 tensors (shaped as ``outputs`` says) on every rank: each owner broadcasts its results as
    one flat tensor."""
    every = {}
    for owner, keys in enumerate(owners):
        total = sum(math.prod(shape) for key in keys for shape in outputs[key])
        if total == 0:
            continue
        if rank == owner:
            flat = torch.cat([t.reshape(-1).to(device, torch.float32) for k in keys for t in results[k]])
        else:
            flat = torch.empty(total, dtype=torch.float32, device=device)
        torch.distributed.broadcast(flat, src=owner)
        if rank == owner:
            every.update({k: results[k] for k in keys})
            continue
        offset = 0
        for key in keys:
            tensors = []
            for shape in outputs[key]:
                tensors.append(flat[offset : offset + math.prod(shape)].view(shape))
                offset += math.prod(shape)
            every[key] = tuple(tensors)
    return {key: every[key] for key in outputs}
