"""Streaming init for models too large to load: ``subspace_peft.init_adapter`` writes the initial PiSSA adapter
straight from a sharded safetensors checkpoint, one weight in memory at a time; training then starts from it with
``PeftModel.from_pretrained(base, folder, is_trainable=True)`` (no SVD at load).

The checkpoint here is SmolLM2-135M saved in shards (or pass --checkpoint DIR: a causal LM folder with its
tokenizer). Prints the peak memory of the init, checks the folder equals what ``get_peft_model`` +
``save_pretrained`` write, and trains a few steps from it.

    python examples/streaming_init.py [--checkpoint DIR] [--rank 16] [--steps 4] [--shard-size 100MB]
"""

import argparse
import json
import os
import re
import sys
import tempfile

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import subspace_peft
from subspace_peft import PiSSAConfig
from subspace_peft.packaged_models import smollm2_path


def peak_rss_mib(reset: bool = False) -> float:
    """Peak resident memory of this process (Linux); ``reset`` starts a new peak from the current use."""
    if not os.path.exists("/proc/self/clear_refs"):  # not Linux: no measurement
        return float("nan")
    if reset:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    with open("/proc/self/status") as handle:
        return int(re.search(r"VmHWM:\s+(\d+)", handle.read()).group(1)) / 1024


def main(work: str) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split(":")[0])
    parser.add_argument("--checkpoint", default=None, help="a sharded checkpoint (default: SmolLM2, re-saved)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--shard-size", default="100MB", help="max_shard_size of the re-saved SmolLM2")
    args = parser.parse_args()
    checkpoint = args.checkpoint
    if checkpoint is None:  # stands in for a model too large to load: the same layout (index + shards)
        checkpoint = os.path.join(work, "checkpoint")
        AutoModelForCausalLM.from_pretrained(smollm2_path()).save_pretrained(checkpoint, max_shard_size=args.shard_size)
        AutoTokenizer.from_pretrained(smollm2_path()).save_pretrained(checkpoint)
    shards = [name for name in os.listdir(checkpoint) if name.endswith(".safetensors")]
    size = sum(os.path.getsize(os.path.join(checkpoint, name)) for name in shards) / 2**20
    print(f"checkpoint: {len(shards)} safetensors file(s), {size:.0f} MiB")

    config = PiSSAConfig(r=args.rank, lora_alpha=args.rank, target_modules="all-linear")
    before = peak_rss_mib(reset=True)
    streamed = subspace_peft.init_adapter(checkpoint, config, os.path.join(work, "streamed"), progress=False)
    peak = peak_rss_mib()
    print(
        f"init_adapter: peak memory {peak:.0f} MiB, {peak - before:.0f} MiB above the {before:.0f} MiB held before it"
    )

    reference = os.path.join(work, "reference")  # what a user with enough memory would do
    get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint), config).save_pretrained(reference)
    mine, theirs = (load_file(os.path.join(d, "adapter_model.safetensors")) for d in (streamed, reference))
    same_keys = mine.keys() == theirs.keys()
    worst = max(((mine[k] - v).norm() / v.norm()).item() for k, v in theirs.items()) if same_keys else float("inf")
    same_config = PeftConfig.from_pretrained(streamed).to_dict() == PeftConfig.from_pretrained(reference).to_dict()
    print(f"equals get_peft_model + save_pretrained: same tensors {same_keys} (worst relative difference "
          f"{worst:.1e}), same adapter_config.json {same_config}")  # fmt: skip

    base = AutoModelForCausalLM.from_pretrained(checkpoint)
    model = PeftModel.from_pretrained(base, streamed, is_trainable=True)  # loads the factors: no SVD
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    batch = tokenizer(["Streaming init writes the adapter one weight at a time."] * 2, return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    losses = []
    for step in range(args.steps):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    print("training from the streamed adapter, loss per step: " + ", ".join(f"{x:.3f}" for x in losses))
    ok = same_keys and same_config and worst <= 1e-5 and losses[-1] < losses[0]
    print(json.dumps(dict(max_relative_difference=worst, same_config=same_config, losses=losses, ok=ok)))
    return 0 if ok else 1


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="streaming_init_") as work:  # the checkpoint and both adapters
        code = main(work)
    sys.exit(code)
