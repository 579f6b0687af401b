"""PiSSA init as the model grows: time and peak memory of PEFT's inits and ours, measured on synthetic Llama-shaped
checkpoints and SmolLM2-135M, then extrapolated to Llama-2-7B and Llama-3-70B shapes with a stated FLOP model.

    python benchmarks/bench_scaling.py [--layers 2 4 8] [--exact-layers 2 4] [--hidden 1024] [--rank 16]

Models: synthetic Llama checkpoints written by bench_streaming_init.write_models (bf16 safetensors, hidden 1024,
intermediate 2816, 16 heads / 4 KV heads, vocab 8192, untied head) at each ``--layers`` count, and SmolLM2-135M
(fp32, 30 layers of 576 / 1536, 9 heads / 3 KV heads). Every variant is PiSSA r=16 (lora_alpha=16), all-linear:

* ``lora``: ``LoraConfig`` (plain LoRA, no SVD); ``peft_pissa``: ``init_lora_weights="pissa"`` (exact SVD);
  ``peft_niter4``: ``init_lora_weights="pissa_niter_4"``;
* ``ours_exact``: ``PiSSAConfig(init="svd")``; ``ours_randomized``: ``PiSSAConfig(init="randomized")`` (defaults:
  niter 2, oversample 16); ``ours_cached``: ``PiSSAConfig(init="svd", svd_cache=DIR)`` after one untimed run that
  fills DIR;
* ``ours_streaming``: ``init_adapter(folder, PiSSAConfig(init="svd"), out, device="cpu")``: reads the checkpoint
  from disk and writes the adapter folder; its whole run is the init.

Each cell is one fresh process. In-memory variants load the model in its stored dtype, read every weight once,
reset the kernel's peak-RSS counter (VmHWM, /proc/self/clear_refs), time ``get_peft_model`` and report the peak above
the loaded model; the streaming variant resets the counter after its imports and reports the peak above that.

Extrapolation (labelled as such): per target matrix (m x n, m >= n, rank r) each variant costs
  LAPACK SVD (peft_pissa)            4 m n^2 + 8 n^3
  Gram route (ours_exact, streaming) 2 m n^2 + 4/3 n^3   (float64 Gram + tridiagonal reduction)
  randomized, q power iterations     (2q + 2) * 2 m n k  (peft_niter4: q=4, k=r; ours_randomized: q=2, k=r+16)
  ours_cached                        m n                 (hashing every weight)
  lora                               r (m + n)           (creating the adapter factors)
summed over the model's targets; per variant, throughput = the largest over the synthetic sizes of F / seconds (no
fixed-cost term: on this shared machine the intercepts are within the noise), and seconds = F / throughput on the
larger shapes (SmolLM2's measured time against the prediction checks the model on other shapes). PEFT's exact PiSSA
runs only at the ``--exact-layers`` sizes (default: the two smallest): it is the slow one. Peak memory:
peak = a * (largest target weight's bytes) + b * (model bytes; streaming: adapter bytes, its 4
factors counted in fp32), least squares with a, b >= 0 over the synthetic sizes (their largest weight is the same, so
a is the intercept: the one weight being decomposed and its workspace; b is what grows with the model).
``--from-json FILE`` redoes the fits and tables from a saved run's measurements.
Prints Markdown tables and writes ``benchmarks/results/scaling.json``. Linux only (VmHWM).
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

from bench_streaming_init import SHAPE, write_models  # noqa: E402

from harness import markdown_table, peak_rss_kib, reset_peak_rss  # noqa: E402

VARIANTS = {
    "lora": ("plain LoRA (peft)", "adapter"),
    "peft_pissa": ("PEFT pissa (exact)", "lapack"),
    "peft_niter4": ("PEFT pissa_niter_4", "randomized_peft"),
    "ours_exact": ("ours svd", "gram"),
    "ours_randomized": ("ours randomized", "randomized_ours"),
    "ours_cached": ("ours svd, cache hit", "params"),
    "ours_streaming": ("ours streaming (init_adapter, svd)", "gram"),
}
# Llama shapes for the extrapolation (bf16)
TARGETS = {
    "Llama-2-7B": dict(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000, tied=False),
    "Llama-3-70B": dict(layers=80, hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=128256, tied=False),
}


def model_spec(folder: str) -> dict:
    with open(os.path.join(folder, "config.json")) as handle:
        c = json.load(handle)
    return dict(
        layers=c["num_hidden_layers"],
        hidden=c["hidden_size"],
        intermediate=c["intermediate_size"],
        heads=c["num_attention_heads"],
        kv_heads=c["num_key_value_heads"],
        vocab=c["vocab_size"],
        tied=c.get("tie_word_embeddings", False),
    )


def target_shapes(spec: dict) -> list[tuple[int, int]]:
    """(out, in) of every all-linear target: q, k, v, o, gate, up, down per layer."""
    h, i = spec["hidden"], spec["intermediate"]
    kv = h // spec["heads"] * spec["kv_heads"]
    return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)] * spec["layers"]


def parameter_count(spec: dict) -> int:
    embeddings = spec["vocab"] * spec["hidden"] * (1 if spec["tied"] else 2)
    return sum(m * n for m, n in target_shapes(spec)) + embeddings + (2 * spec["layers"] + 1) * spec["hidden"]


def flops(kind: str, shapes: list[tuple[int, int]], rank: int) -> float:
    total = 0.0
    for a, b in shapes:
        m, n = max(a, b), min(a, b)
        total += {
            "lapack": 4 * m * n**2 + 8 * n**3,
            "gram": 2 * m * n**2 + 4 / 3 * n**3,
            "randomized_peft": (2 * 4 + 2) * 2 * m * n * rank,
            "randomized_ours": (2 * 2 + 2) * 2 * m * n * min(rank + 16, n),
            "params": m * n,
            "adapter": rank * (m + n),
        }[kind]
    return total


def run_variant(variant: str, folder: str, rank: int, cache_dir: str, out: str) -> dict:
    import gc

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import subspace_peft

    torch.set_num_threads(os.cpu_count() or 1)
    common = dict(r=rank, lora_alpha=rank, target_modules="all-linear")
    if variant == "ours_streaming":
        reset_peak_rss()
        before = peak_rss_kib()
        start = time.perf_counter()
        subspace_peft.init_adapter(folder, subspace_peft.PiSSAConfig(**common, init="svd"), out, device="cpu",
                                   progress=False)  # fmt: skip
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "peak_mib": (peak_rss_kib() - before) / 1024}
    if variant.startswith("ours"):
        init = "randomized" if variant == "ours_randomized" else "svd"
        cache = cache_dir if variant == "ours_cached" else None
        config = subspace_peft.PiSSAConfig(**common, init=init, svd_cache=cache)
    else:
        init = {"lora": True, "peft_pissa": "pissa", "peft_niter4": "pissa_niter_4"}[variant]
        config = LoraConfig(**common, init_lora_weights=init)
    model = AutoModelForCausalLM.from_pretrained(folder)  # its stored dtype: bf16 (synthetic), fp32 (SmolLM2)
    with torch.no_grad():  # every weight page resident, so the peak compares inits, not lazy loading
        sum(float(p.float().sum()) for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gc.collect()  # the collection loading leaves pending would otherwise land in the timed call
    reset_peak_rss()
    before = peak_rss_kib()
    start = time.perf_counter()
    get_peft_model(model, config)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mib": (peak_rss_kib() - before) / 1024, "model_mib": model_bytes / 2**20}


def spawn(variant: str, folder: str, rank: int, cache_dir: str, out: str, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--folder", folder, "--rank", str(rank)]
    cmd += ["--cache-dir", cache_dir, "--out", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} on {folder} failed:\n{proc.stderr[-3000:]}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def fit(points: list[tuple[float, float]]) -> float:
    """Seconds per FLOP: the smallest over the measured (FLOPs, seconds) points of seconds / FLOPs (the other users
    of this machine's 2 cores only ever add time; one slowed cell would dominate a ratio of sums or a mean)."""
    return min(y / x for x, y in points)


def linear_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(a, b) of y = a + b x, least squares with a, b >= 0."""
    n = len(points)
    mean_x, mean_y = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    b = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx if sxx else 0.0
    if b < 0:
        return mean_y, 0.0
    a = mean_y - b * mean_x
    if a < 0:
        return 0.0, sum(x * y for x, y in points) / sum(x * x for x, _ in points)
    return a, b


def largest_weight_bytes(spec: dict) -> int:
    return max(m * n for m, n in target_shapes(spec)) * 2  # bf16


def grows_with(variant: str, spec: dict, rank: int) -> float:
    """The bytes a variant's peak grows with: the model's (bf16), or for streaming the adapter's (fp32 factors)."""
    if variant == "ours_streaming":
        return sum(rank * (m + n) for m, n in target_shapes(spec)) * 2 * 2 * 4  # (A, B) and (A_0, B_0)
    return parameter_count(spec) * 2


def extrapolate(measured: list[dict], rank: int) -> dict:
    synthetic = [row for row in measured if row["model"].startswith("synthetic")]
    result = {"fits": {}, "models": {}}
    for variant, (_, kind) in VARIANTS.items():
        done = [r for r in synthetic if r[variant]]
        slope = fit([(r["flops"][variant], r[variant]["seconds"]) for r in done])
        checks = {
            r["model"]: {"measured_s": r[variant]["seconds"], "predicted_s": slope * r["flops"][variant]}
            for r in measured
            if r not in synthetic and r[variant]
        }
        a, b = linear_fit([(grows_with(variant, r["spec"], rank) / 2**20, r[variant]["peak_mib"]) for r in done])
        result["fits"][variant] = {
            "flop_model": kind,
            "gflop_per_s": 1e-9 / slope,
            "checks": checks,
            "peak_per_largest_weight": a / (largest_weight_bytes(done[0]["spec"]) / 2**20),
            "peak_per_growing_byte": b,
        }
    for name, spec in TARGETS.items():
        cells = {}
        for variant, (_, kind) in VARIANTS.items():
            fitted = result["fits"][variant]
            seconds = flops(kind, target_shapes(spec), rank) / fitted["gflop_per_s"] / 1e9
            peak_mib = (
                fitted["peak_per_largest_weight"] * largest_weight_bytes(spec)
                + fitted["peak_per_growing_byte"] * grows_with(variant, spec, rank)
            ) / 2**20
            cells[variant] = {"seconds": seconds, "peak_mib": peak_mib}
        result["models"][name] = {"spec": spec, "model_gib": parameter_count(spec) * 2 / 2**30, "variants": cells}
    return result


def print_tables(measured: list[dict], extrapolated: dict, rank: int) -> None:
    headers = ["model", "model GiB"] + [label for label, _ in VARIANTS.values()]
    for title, key, fmt in (("init s", "seconds", "{:.2f}"), ("peak MiB above the loaded model", "peak_mib", "{:.0f}")):
        print(f"\nMeasured, {title} (one fresh process per cell; streaming: above its imports):\n")
        rows = [
            [r["model"], f"{r['model_gib']:.2f}"] + [fmt.format(r[v][key]) if r[v] else "-" for v in VARIANTS]
            for r in measured
        ]
        print(markdown_table(headers, rows))
    print("\nThroughput per variant (best over the synthetic sizes of FLOPs / s), checked on SmolLM2's shapes:\n")
    rows = []
    for variant, fitted in extrapolated["fits"].items():
        checks = ", ".join(f"{m}: {c['measured_s']:.2f} vs {c['predicted_s']:.2f}" for m, c in fitted["checks"].items())
        memory = f"{fitted['peak_per_largest_weight']:.2f} W + {fitted['peak_per_growing_byte']:.3f} M"
        rows.append([VARIANTS[variant][0], fitted["flop_model"], f"{fitted['gflop_per_s']:.3g}", checks, memory])
    headers_fit = ["variant", "FLOP model", "G(FL)OP/s", "measured vs predicted s", "peak = a W + b M"]
    print(markdown_table(headers_fit, rows))
    print("\n(W: largest target weight, M: model bytes, for streaming the adapter's bytes)")
    for title, key, fmt in (("init s", "seconds", "{:,.0f}"), ("peak GiB", "peak_mib", "{:,.1f}")):
        print(f"\nEXTRAPOLATED (not measured), {title}, r={rank}, bf16 weights, from the fits above:\n")
        rows = []
        for name, model in extrapolated["models"].items():
            scale = 1 if key == "seconds" else 1 / 1024
            cells = [fmt.format(model["variants"][v][key] * scale) for v in VARIANTS]
            rows.append([name, f"{model['model_gib']:.1f}"] + cells)
        print(markdown_table(headers, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--exact-layers", type=int, nargs="*", default=None, help="PEFT exact: default 2 smallest")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--no-smollm2", action="store_true", help="synthetic models only")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per cell")
    parser.add_argument("--work", default=None, help="folder for the checkpoints (default: a temporary one)")
    parser.add_argument("--from-json", help="redo the fits and tables from this scaling.json's measurements")
    parser.add_argument("--child")
    parser.add_argument("--folder")
    parser.add_argument("--cache-dir")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_variant(args.child, args.folder, args.rank, args.cache_dir, args.out)))
        return

    if args.from_json:
        with open(args.from_json) as handle:
            saved = json.load(handle)
        report(saved["measured"], saved["rank"], saved.get("hidden", args.hidden), saved.get("wall_s"))
        return
    start = time.perf_counter()
    exact_layers = sorted(args.layers)[:2] if args.exact_layers is None else args.exact_layers
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        folders = {f"synthetic {n} layers": path for n, path in write_models(work, args.layers, args.hidden).items()}
        if not args.no_smollm2:
            from models import smollm2_path

            folders["SmolLM2-135M"] = smollm2_path()
        measured = []
        for index, (name, folder) in enumerate(folders.items()):
            spec = model_spec(folder)
            row = {"model": name, "spec": spec, "flops": {}}
            cache_dir = os.path.join(work, f"cache-{index}")
            spawn("ours_cached", folder, args.rank, cache_dir, "", args.timeout)  # untimed: fills the cache
            for variant, (_, kind) in VARIANTS.items():
                out = os.path.join(work, f"adapter-{index}-{variant}")
                if variant == "peft_pissa" and name.startswith("synthetic") and spec["layers"] not in exact_layers:
                    row[variant] = None
                    continue
                row[variant] = spawn(variant, folder, args.rank, cache_dir, out, args.timeout)
                row["flops"][variant] = flops(kind, target_shapes(spec), args.rank)
                print(f"{name}, {variant}: {row[variant]}", file=sys.stderr, flush=True)
            row["model_gib"] = row["lora"]["model_mib"] / 1024
            measured.append(row)
    report(measured, args.rank, args.hidden, time.perf_counter() - start)


def report(measured: list[dict], rank: int, hidden: int, wall_s: float | None) -> None:
    extrapolated = extrapolate(measured, rank)
    inter = SHAPE["intermediate"] * hidden // 2048
    print(
        f"\nPiSSA r={rank}, all-linear (7 targets a layer). Synthetic: Llama-shaped, bf16, hidden {hidden}, "
        f"intermediate {inter}, {SHAPE['heads']} heads / {SHAPE['kv_heads']} KV heads, vocab {SHAPE['vocab']}. "
        f"SmolLM2-135M: fp32. Measuring took {wall_s or float('nan'):.0f} s."
    )
    print_tables(measured, extrapolated, rank)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    record = {"rank": rank, "hidden": hidden, "wall_s": wall_s, "measured": measured, "extrapolated": extrapolated}
    with open(os.path.join(HERE, "results", "scaling.json"), "w") as handle:
        json.dump(record, handle, indent=2)


if __name__ == "__main__":
    main()
