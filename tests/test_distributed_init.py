"""The SVD init split across the ranks of a torch.distributed job (torchrun, 2 ranks, gloo on CPU): every rank
decomposes only its share of the targets, and every rank ends with the adapters a one-process init gives, whether
the base weights are whole on every rank, partitioned by DeepSpeed ZeRO-3 (zero.Init), sharded by FSDP2, or held by
rank 0 alone (accelerate's fsdp_cpu_ram_efficient_loading)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from test_fsdp2 import run_two_ranks, tiny_llama

from parity import rel_err

pytestmark = pytest.mark.slow  # torchrun / several processes
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "recipes"))

# the tiny Llama's all-linear targets per decoder layer (d_out, d_in): q, k, v, o, gate, up, down
SHAPES = [(16, 16), (8, 16), (8, 16), (16, 16), (32, 16), (32, 16), (16, 32)]
TARGETS = 2 * len(SHAPES)
LARGEST = max(m * n for m, n in SHAPES)
TOTAL = 2 * sum(m * n for m, n in SHAPES)
# the greedy split by m * n * min(m, n) over 2 ranks: q, o, gate, up, down cost 4096, k and v 2048 (x 2 layers);
# 10 costs of 4096 go 5 and 5, then the 4 of 2048 go 2 and 2
SHARE = TARGETS // 2


def init_config(method: str):
    import subspace_peft

    return {
        "pissa": lambda: subspace_peft.PiSSAConfig(r=2, lora_alpha=4, target_modules="all-linear", init="svd"),
        "svfit": lambda: subspace_peft.SVFitConfig(r=2, target_modules="all-linear", init="svd"),
        # ranks chosen by energy: every target's singular values first, split across the ranks too
        "svfit_energy": lambda: subspace_peft.SVFitConfig(energy=0.9, target_modules="all-linear", init="svd"),
        "effort": lambda: subspace_peft.EffortConfig(residual_rank=2, target_modules="all-linear"),
        "qpissa": lambda: subspace_peft.PiSSAConfig(
            r=2, target_modules="all-linear", init="svd", residual_quantization="nf4"
        ),
    }[method]()


def one_process(method: str) -> dict[str, torch.Tensor]:
    """The adapter tensors (and the base weights, under ``base.``) of a one-process init."""
    from peft import get_peft_model

    model = get_peft_model(tiny_llama(), init_config(method))
    tensors = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        adapter = any(part.split("_")[0] in ("pissa", "svfit", "effort") for part in name.split("."))
        tensors[name if adapter else "base." + name] = tensor.detach().clone()
    return tensors


def results(tmp_path, methods) -> dict[tuple[str, int], dict]:
    """What each rank's worker wrote per method (its SVD count and gathering record, or the refusal)."""
    return {
        (method, rank): json.loads((tmp_path / f"{method}_rank{rank}.json").read_text())
        for method in methods
        for rank in (0, 1)
    }


def check_equal_to_one_process(tmp_path, method: str, ranks=(0, 1), suffix: str = "") -> None:
    from safetensors.torch import load_file

    single = one_process(method.removesuffix("_opted_out"))
    adapter_keys = {k for k in single if not k.startswith("base.")}
    assert adapter_keys
    for rank in ranks:
        split = load_file(tmp_path / f"{method}_rank{rank}{suffix}.safetensors")
        if suffix == "_loaded":  # after accelerate's loading: the adapter (non-persistent base buffers stay on meta)
            single = {k: v for k, v in single.items() if k in adapter_keys or k in split}
        assert set(split) == set(single), (rank, sorted(set(split) ^ set(single))[:5])
        worst = max(rel_err(split[k], single[k]) for k in adapter_keys)
        assert worst <= 1e-6, (method, rank, worst)
        for key in set(single) - adapter_keys:  # the base weights: untouched (QPiSSA: the same quantised residual)
            assert torch.equal(split[key], single[key]), (method, rank, key)


def check_shares(tmp_path, methods, layout: str) -> None:
    found = results(tmp_path, methods)
    for method in methods:
        for rank in (0, 1):
            record = found[(method, rank)]
            assert record["layout"] == layout
            assert record["owned"] == SHARE and record["decomposed"] == SHARE, record
            if layout != "whole":  # one weight made whole at a time, and no more than one held
                assert 0 < record["largest_gathered"] <= LARGEST < TOTAL, record
                assert record["held_peak"] <= LARGEST, record


def test_whole_weights_every_method_decomposes_half_and_matches_one_process(tmp_path):
    methods = ["pissa", "svfit", "svfit_energy", "effort", "qpissa"]
    run_two_ranks("distributed_init_worker.py", "whole", str(tmp_path), *methods, "mismatch", "effort_opted_out")
    check_shares(tmp_path, methods, "whole")
    for method in methods:
        check_equal_to_one_process(tmp_path, method)
    found = results(tmp_path, ["mismatch", "effort_opted_out"])
    for rank in (0, 1):
        # ranks that planned different adapters: the same clear error on both (no hang), the models untouched
        assert "planned different adapters (ranks [1] differ" in found[("mismatch", rank)]["refused"]
        assert found[("mismatch", rank)]["model_untouched"]
        # SUBSPACE_PEFT_DISTRIBUTED_INIT=0: every rank decomposes every target itself, as before
        assert found[("effort_opted_out", rank)]["decomposed"] == TARGETS
        assert found[("effort_opted_out", rank)]["layout"] is None  # no split init ran
    check_equal_to_one_process(tmp_path, "effort_opted_out")


def test_zero3_partitioned_weights_are_gathered_one_at_a_time(tmp_path):
    pytest.importorskip("deepspeed")
    methods = ["pissa", "svfit_energy", "effort", "qpissa"]
    run_two_ranks("distributed_init_worker.py", "zero3", str(tmp_path), *methods)
    assert all(record["partitioned"] for record in results(tmp_path, methods[:3]).values())
    check_shares(tmp_path, methods[:3], "zero3")
    for method in methods[:3]:
        check_equal_to_one_process(tmp_path, method)
    # the shipped recipe's path on: DeepSpeed's engine takes the model built on the partitioned base and trains it
    for rank in (0, 1):
        trained = results(tmp_path, ["pissa"])[("pissa", rank)]
        assert trained["adapter_whole_before_engine"] and trained["adapter_partitioned_by_engine"], trained
        assert 3.0 < trained["loss"] < 5.0, trained  # about ln(64) = 4.16 for the untrained tiny model
    for rank in (0, 1):  # refused on every rank (none waits for the other), naming the fix
        refused = results(tmp_path, ["qpissa"])[("qpissa", rank)]["refused"]
        assert "partitioned by DeepSpeed ZeRO-3" in refused and "zero3_init_flag: false" in refused, refused


def test_fsdp2_sharded_weights_are_gathered_one_at_a_time(tmp_path):
    methods = ["pissa", "effort"]
    run_two_ranks("distributed_init_worker.py", "dtensor", str(tmp_path), *methods)
    assert all(record["sharded"] for record in results(tmp_path, methods).values())
    # sharded before the adapter existed: the adapter is not under FSDP, which get_peft_model says on every rank
    assert all("shard after get_peft_model" in record["warnings"][0] for record in results(tmp_path, methods).values())
    check_shares(tmp_path, methods, "dtensor")
    for method in methods:
        check_equal_to_one_process(tmp_path, method)


def test_fsdp2_cpu_ram_efficient_loading_rank0_sends_each_weight_to_its_owner(tmp_path):
    methods = ["pissa", "svfit"]
    run_two_ranks("distributed_init_worker.py", "rank0", str(tmp_path), *methods)
    check_shares(tmp_path, methods, "rank0")
    found = results(tmp_path, methods)
    for method in methods:
        # rank 0's adapter is the one-process adapter; rank 1 built its layers on meta, for accelerate to fill
        check_equal_to_one_process(tmp_path, method, ranks=(0,))
        assert found[(method, 0)]["adapters_on_meta"] == 0
        assert found[(method, 1)]["adapters_on_meta"] == 4 * TARGETS  # PiSSA: A, B, A_0, B_0; SVFit: U, Vh, s, s_0
        # accelerate 1.15 then broadcasts parameters only: the frozen factors, buffers that FSDP2 leaves unsharded,
        # stop it (recipes/guards.py refuses fsdp_cpu_ram_efficient_loading for these methods because of this);
        # accelerate 1.16 broadcasts buffers too, and every rank ends with the one-process adapter
        if ACCELERATE_BROADCASTS_BUFFERS:
            assert found[(method, 0)]["accelerate_loading"] == "ok", found[(method, 0)]
            check_equal_to_one_process(tmp_path, method, ranks=(0, 1), suffix="_loaded")
        else:
            assert "device_mesh" in found[(method, 0)]["accelerate_loading"], found[(method, 0)]


def _accelerate_broadcasts_buffers() -> bool:
    import accelerate
    from packaging.version import Version

    return Version(accelerate.__version__) >= Version("1.16")


ACCELERATE_BROADCASTS_BUFFERS = _accelerate_broadcasts_buffers()


def _accelerate_env(config_file: str) -> dict:
    """The loading settings ``accelerate launch --config_file`` exports for one of recipes/accelerate/*.yaml."""
    import yaml

    config = yaml.safe_load(open(os.path.join(ROOT, "recipes", "accelerate", config_file)))
    env = {}
    if config["distributed_type"] == "DEEPSPEED":
        env["ACCELERATE_USE_DEEPSPEED"] = "true"
        env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] = str(config["deepspeed_config"]["zero3_init_flag"]).lower()
    if config["distributed_type"] == "FSDP":
        env["ACCELERATE_USE_FSDP"] = "true"
        env["FSDP_CPU_RAM_EFFICIENT_LOADING"] = str(config["fsdp_config"]["fsdp_cpu_ram_efficient_loading"]).lower()
    return env


def test_the_recipe_takes_the_shipped_zero3_init_flag_and_refuses_what_cannot_work():
    from subspace_peft.methods import METHODS

    from guards import launch_problem

    records = {record.name: record for record in METHODS}
    zero3 = _accelerate_env("deepspeed_zero3.yaml")
    assert zero3["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "true"  # the shipped config loads the base partitioned
    for record in METHODS:
        assert launch_problem(record, "none", zero3) is None, record.name
    qpissa = launch_problem(records["pissa"], "4bit", zero3)
    assert "zero3_init_flag: false" in qpissa and "QPiSSA" in qpissa
    assert launch_problem(records["lora"], "4bit", zero3) is None
    fsdp = _accelerate_env("fsdp.yaml")
    assert fsdp["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false"  # the shipped FSDP config runs every method
    for record in METHODS:
        assert launch_problem(record, "none", fsdp) is None, record.name
    efficient = dict(fsdp, FSDP_CPU_RAM_EFFICIENT_LOADING="true")
    for name in ("lora", "flora"):
        assert launch_problem(records[name], "none", efficient) is None
    for name in ("pissa", "svfit", "effort"):
        assert "fsdp_cpu_ram_efficient_loading: false" in launch_problem(records[name], "none", efficient), name


def test_a_record_says_frozen_buffers_exactly_when_its_layers_hold_buffers():
    from peft import get_peft_model

    from subspace_peft.methods import METHODS

    for record in METHODS:
        if record.name == "lora":
            continue
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        config = record.config_cls(**dict(record.recipe_defaults, target_modules=["0"]))
        names = [name for name, _ in get_peft_model(model, config).named_buffers()]
        assert bool(names) == record.frozen_buffers, (record.name, names)
