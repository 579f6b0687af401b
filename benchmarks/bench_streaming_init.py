"""Streaming adapter init from disk (``subspace_peft.init_adapter``) against PEFT's PiSSA on the loaded model: peak
memory and time as the model grows.

    python benchmarks/bench_streaming_init.py [--layers 4 8 16 32] [--rank 16] [--hidden 2048] [--work DIR]

Writes synthetic Llama-shaped checkpoints (bf16 safetensors, one shard per decoder layer; hidden 2048, intermediate
5632, 16 heads with 4 KV heads, vocab 8192, untied head: ~90 MB per layer, 2.95 GB at 32 layers; the smaller
models link the first shards of the largest) and, for each size, runs in a fresh process each:

* ``ours``: ``init_adapter(folder, PiSSAConfig(r, lora_alpha=r, all-linear, init="randomized", niter=4), out,
  device="cpu")``: the adapter folder written from disk, one weight in memory at a time;
* ``peft``: ``AutoModelForCausalLM.from_pretrained(folder, dtype=bfloat16)``, then ``get_peft_model`` with
  ``LoraConfig(r, lora_alpha=r, all-linear, init_lora_weights="pissa_niter_4")`` and ``save_pretrained``: what a
  user of PEFT's PiSSA does to get the same folder.

Peak RSS is VmHWM after the imports (reset through /proc/self/clear_refs), so it counts what each variant holds, not
the ~0.5 GB of Python, torch and transformers both share; time is wall-clock from the call to the written folder.
Both use a randomized SVD with 4 power iterations. Linux only (VmHWM). Prints a Markdown table and writes
``benchmarks/results/streaming_init.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from harness import markdown_table, peak_rss_kib, reset_peak_rss  # noqa: E402

SHAPE = {"intermediate": 5632, "heads": 16, "kv_heads": 4, "vocab": 8192}


def _llama_config(layers: int, hidden: int):
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=SHAPE["intermediate"] * hidden // 2048,
        num_attention_heads=SHAPE["heads"],
        num_key_value_heads=SHAPE["kv_heads"],
        vocab_size=SHAPE["vocab"],
        num_hidden_layers=layers,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    config.architectures = ["LlamaForCausalLM"]
    return config


def write_models(root: str, sizes: list[int], hidden: int) -> dict[int, str]:
    """One folder per size; layer shards written once (for the largest) and linked into the smaller ones."""
    import torch
    from safetensors.torch import save_file

    shards = os.path.join(root, "shards")
    os.makedirs(shards, exist_ok=True)
    config = _llama_config(max(sizes), hidden)
    head = hidden // config.num_attention_heads
    kv = head * config.num_key_value_heads
    inter = config.intermediate_size
    generator = torch.Generator().manual_seed(0)

    def weights(shapes: dict) -> dict:
        return {
            name: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            if len(shape) == 2
            else torch.ones(shape, dtype=torch.bfloat16)
            for name, shape in shapes.items()
        }

    files: dict[str, dict[str, tuple]] = {
        "embed.safetensors": {
            "model.embed_tokens.weight": (config.vocab_size, hidden),
            "model.norm.weight": (hidden,),
            "lm_head.weight": (config.vocab_size, hidden),
        }
    }
    for i in range(max(sizes)):
        p = f"model.layers.{i}."
        files[f"layer-{i:03d}.safetensors"] = {
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    for file, shapes in files.items():
        path = os.path.join(shards, file)
        if not os.path.exists(path):
            save_file(weights(shapes), path, metadata={"format": "pt"})
    folders = {}
    for size in sizes:
        folder = os.path.join(root, f"llama-{size}")
        os.makedirs(folder, exist_ok=True)
        _llama_config(size, hidden).save_pretrained(folder)
        wanted = ["embed.safetensors"] + [f"layer-{i:03d}.safetensors" for i in range(size)]
        weight_map = {name: file for file in wanted for name in files[file]}
        for file in wanted:
            link = os.path.join(folder, file)
            if not os.path.exists(link):
                os.symlink(os.path.join(shards, file), link)
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as handle:
            json.dump({"metadata": {}, "weight_map": weight_map}, handle)
        folders[size] = folder
    return folders


def run_variant(variant: str, folder: str, rank: int, out: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import subspace_peft

    torch.set_num_threads(os.cpu_count() or 1)
    reset_peak_rss()
    rss_before = peak_rss_kib()
    start = time.perf_counter()
    if variant == "ours":
        config = subspace_peft.PiSSAConfig(
            r=rank, lora_alpha=rank, target_modules="all-linear", init="randomized", niter=4
        )
        subspace_peft.init_adapter(folder, config, out, device="cpu", progress=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear", init_lora_weights="pissa_niter_4")
        get_peft_model(model, config).save_pretrained(out)
    seconds = time.perf_counter() - start
    peak = peak_rss_kib()
    adapter = os.path.join(out, "adapter_model.safetensors")
    return {
        "seconds": seconds,
        "peak_mib": (peak - rss_before) / 1024,
        "rss_before_mib": rss_before / 1024,
        "adapter_mib": os.path.getsize(adapter) / 2**20,
    }


def spawn(variant: str, folder: str, rank: int, out: str) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--folder", folder, "--rank", str(rank), "--out", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} on {folder} failed:\n{proc.stderr[-3000:]}")
    line = next(out for out in proc.stdout.splitlines() if out.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def folder_gib(folder: str) -> float:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors")) / (
        2**30
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--work", default=None, help="folder for the checkpoints (default: a temporary one)")
    parser.add_argument("--child")
    parser.add_argument("--folder")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_variant(args.child, args.folder, args.rank, args.out)))
        return

    with tempfile.TemporaryDirectory(dir=args.work) as work:
        start = time.perf_counter()
        folders = write_models(work, args.layers, args.hidden)
        print(f"wrote the checkpoints in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        rows, results = [], []
        for size in args.layers:
            size_gib = folder_gib(folders[size])
            row = {"layers": size, "checkpoint_gib": size_gib}
            for variant in ("ours", "peft"):
                out = os.path.join(work, f"adapter-{variant}-{size}")
                row[variant] = spawn(variant, folders[size], args.rank, out)
                print(f"{size} layers, {variant}: {row[variant]}", file=sys.stderr, flush=True)
            results.append(row)
            rows.append(
                [
                    size,
                    f"{size_gib:.2f}",
                    f"{row['ours']['peak_mib']:.0f}",
                    f"{row['peft']['peak_mib']:.0f}",
                    f"{row['ours']['seconds']:.1f}",
                    f"{row['peft']['seconds']:.1f}",
                    f"{row['ours']['adapter_mib']:.1f}",
                ]
            )
    inter = SHAPE["intermediate"] * args.hidden // 2048
    print(
        f"\nSynthetic Llama (bf16, hidden {args.hidden}, intermediate {inter}, {SHAPE['heads']} heads / "
        f"{SHAPE['kv_heads']} KV heads, vocab {SHAPE['vocab']}), PiSSA r={args.rank} all-linear (7 layers per block), "
        "randomized SVD with 4 power iterations in both; one fresh process per cell; peak RSS above the imports\n"
    )
    headers = ["layers", "checkpoint GiB", "ours peak MiB", "PEFT peak MiB", "ours s", "PEFT s", "adapter MiB"]
    print(markdown_table(headers, rows))
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "streaming_init.json"), "w") as handle:
        json.dump({"rank": args.rank, "hidden": args.hidden, "shape": SHAPE, "rows": results}, handle, indent=2)


if __name__ == "__main__":
    main()
