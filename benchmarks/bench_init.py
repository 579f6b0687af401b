"""SVD init (PiSSA, Effort): time, principal-subspace error and peak memory, ours against PEFT's, on SmolLM2-135M.

    python benchmarks/bench_init.py [--reps 3] [--rank 16]

Each variant runs in a fresh process (so peak memory is its own): load the fp32 model, read every weight once (so
all pages are resident, as in training), reset the kernel's peak-RSS
counter (/proc/self/clear_refs), time ``get_peft_model(..., all-linear, r)``, read VmHWM. Time ratios are against
PEFT's ``pissa_niter_4``; memory ratios against a plain LoRA init of the same model. The principal-subspace error of
a layer is 1 - ||U_exact^T U||_F^2 / r for the unit columns U of the initial B factor (0 when the top-r left singular
subspace is found exactly); the energy shortfall is 1 - sum(S_found^2) / sum(S_exact^2) over the top r. Both are
averaged over layers. The ``*_lapack`` variants run our init with the exact SVD as it was before the Gram route
(subspace_peft/linalg/gram.py), LAPACK's full fp32 SVD, for the side-by-side ratios printed last: ours exact against
PEFT's exact ``pissa``, Effort against Effort on LAPACK, a cache hit against a plain LoRA init. Linux only (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

VARIANTS = {
    "lora": "plain LoRA (peft, init_lora_weights=True)",
    "peft_pissa": "PEFT pissa (exact SVD)",
    "peft_pissa_niter_4": "PEFT pissa_niter_4",
    "ours_exact": "subspace-peft init='svd'",
    "ours_randomized": "subspace-peft init='randomized' (defaults)",
    "ours_cached": "subspace-peft init='svd', svd_cache hit",
    "ours_exact_lapack": "subspace-peft init='svd', LAPACK's full SVD (before the Gram route)",
    "effort": "subspace-peft Effort (exact minor SVD, residual_rank=1)",
    "effort_lapack": "subspace-peft Effort, LAPACK's full SVD (before the Gram route)",
}
# variants without a PiSSA B factor to compare with the exact principal subspace
NO_FACTORS = ("lora", "effort", "effort_lapack")


def run_variant(variant: str, rank: int, cache_dir: str, factors_out: str | None) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    import subspace_peft

    from harness import peak_rss_kib, reset_peak_rss
    from models import smollm2_path

    if variant.endswith("_lapack"):  # the exact SVD as it was computed before the Gram route (linalg/gram.py)
        import subspace_peft.linalg.svd as svd

        svd.gram_svd = lambda *args, **kwargs: None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    with torch.no_grad():  # fault every weight page in, so peak RSS compares inits, not lazy safetensors loading
        checksum = sum(float(p.sum()) for p in model.parameters())
    if variant == "lora":
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear")
    elif variant.startswith("peft_pissa"):
        init = "pissa" if variant == "peft_pissa" else "pissa_niter_4"
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear", init_lora_weights=init)
    elif variant.startswith("effort"):
        config = subspace_peft.EffortConfig(target_modules="all-linear")
    else:
        init = "randomized" if variant == "ours_randomized" else "svd"
        cache = cache_dir if variant == "ours_cached" else None
        config = subspace_peft.PiSSAConfig(
            r=rank, lora_alpha=rank, target_modules="all-linear", init=init, svd_cache=cache
        )
    reset_peak_rss()
    rss_before = peak_rss_kib()
    start = time.perf_counter()
    peft_model = get_peft_model(model, config)
    seconds = time.perf_counter() - start
    peak = peak_rss_kib()
    if factors_out:
        b_factors = {}
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
                b_factors[name.split("base_model.model.")[-1]] = module.lora_B["default"].weight.detach().clone()
            if hasattr(module, "pissa_B0") and "default" in getattr(module, "pissa_B0", {}):
                b_factors[name.split("base_model.model.")[-1]] = module.pissa_B0["default"].weight.detach().clone()
        save_file(b_factors, factors_out)
    return {"seconds": seconds, "peak_mib": peak / 1024, "rss_before_mib": rss_before / 1024, "checksum": checksum}


def subspace_errors(factors_file: str, rank: int, exact: dict) -> tuple[float, float]:
    from safetensors.torch import load_file

    from subspace_peft.linalg import subspace_error

    factors = load_file(factors_file)
    errors, shortfalls = [], []
    for name, b in factors.items():
        u_exact, s_exact = exact[name]
        norms = b.norm(dim=0)
        errors.append(subspace_error(u_exact, b / norms))
        # B = U diag(sqrt(S / s)) with s = 1 here, so the column norms squared are the singular values found
        found = norms.pow(2)
        shortfalls.append(max(0.0, 1 - found.pow(2).sum().item() / s_exact.pow(2).sum().item()))  # >= 0 up to round-off
    return statistics.mean(errors), statistics.mean(shortfalls)


def exact_spectra(rank: int) -> dict:
    import torch
    from safetensors.torch import load_file

    from models import smollm2_path

    weights = load_file(os.path.join(smollm2_path(), "model.safetensors"))
    out = {}
    for key, weight in weights.items():
        if weight.ndim == 2 and "embed" not in key and "lm_head" not in key:
            u, s, _ = torch.linalg.svd(weight.float(), full_matrices=False)
            out[key.removesuffix(".weight")] = (u[:, :rank].contiguous(), s[:rank].contiguous())
    return out


def child(args) -> None:
    result = run_variant(args.variant, args.rank, args.cache_dir, args.factors_out)
    print("RESULT " + json.dumps(result))


def spawn(variant: str, rank: int, cache_dir: str, factors_out: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--rank", str(rank), "--cache-dir", cache_dir]
    if factors_out:
        cmd += ["--factors-out", factors_out]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{proc.stderr[-3000:]}")
    line = next(out for out in proc.stdout.splitlines() if out.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--child")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--factors-out", default=None)
    args = parser.parse_args()
    if args.child:
        args.variant = args.child
        child(args)
        return

    from models import smollm2_path

    smollm2_path()  # convert once, outside the timed runs
    with tempfile.TemporaryDirectory() as work:
        cache_dir = os.path.join(work, "svd-cache")
        # untimed: fills the SVD cache, so that the timed "ours_cached" runs measure hits, and warms the OS file cache
        spawn("ours_cached", args.rank, cache_dir)
        rows = {}
        for variant in VARIANTS:
            runs = []
            for rep in range(args.reps):
                factors = (
                    os.path.join(work, f"{variant}.safetensors") if rep == 0 and variant not in NO_FACTORS else None
                )
                runs.append(spawn(variant, args.rank, cache_dir, factors))
                print(f"{variant} rep {rep}: {runs[-1]}", file=sys.stderr, flush=True)
            rows[variant] = {
                "seconds": statistics.median(r["seconds"] for r in runs),
                "peak_mib": statistics.median(r["peak_mib"] for r in runs),
            }
        exact = exact_spectra(args.rank)
        for variant in VARIANTS:
            if variant not in NO_FACTORS:
                rows[variant]["subspace_error"], rows[variant]["energy_shortfall"] = subspace_errors(
                    os.path.join(work, f"{variant}.safetensors"), args.rank, exact
                )
    exact_ratio = rows["ours_exact"]["seconds"] / rows["peft_pissa"]["seconds"]
    effort_ratio = rows["effort"]["seconds"] / rows["effort_lapack"]["seconds"]
    cached_ratio = rows["ours_cached"]["seconds"] / rows["lora"]["seconds"]
    time_ref = rows["peft_pissa_niter_4"]["seconds"]
    mem_ref = rows["lora"]["peak_mib"]
    print(f"\nSmolLM2-135M fp32, all-linear (210 layers), r={args.rank}, median of {args.reps} fresh processes\n")
    print(
        "| variant | init s | time / pissa_niter_4 | peak RSS MiB | peak / LoRA | subspace error | energy shortfall |"
    )
    print("|---|---|---|---|---|---|---|")
    for variant, label in VARIANTS.items():
        row = rows[variant]
        err = f"{row['subspace_error']:.3f}" if "subspace_error" in row else "-"
        short = f"{row['energy_shortfall']:.4f}" if "energy_shortfall" in row else "-"
        print(
            f"| {label} | {row['seconds']:.2f} | {row['seconds'] / time_ref:.2f}x | {row['peak_mib']:.0f} | "
            f"{row['peak_mib'] / mem_ref:.3f}x | {err} | {short} |"
        )
    print(f"\nours exact / PEFT pissa (exact): {exact_ratio:.2f}x")
    print(f"Effort init / Effort with LAPACK's SVD: {effort_ratio:.2f}x")
    print(f"cache hit / plain LoRA init: {cached_ratio:.2f}x")


if __name__ == "__main__":
    main()
