"""Randomized SVD: time against principal-subspace error on SmolLM2-135M's 210 linear weights, SVD only.

    python benchmarks/bench_svd_frontier.py [--rank 16] [--reps 3]

Measures the SVD alone (no model wrapping), so it shows whether any setting reaches issue 2's target of half the
time of PEFT's ``pissa_niter_4`` (``torch.svd_lowrank(W, r, niter=4)``) at equal or lower error. Rows: PEFT's call at
several ``niter``; our ``SVDSettings(method="randomized")`` over a grid of ``niter`` x ``oversample``; and a block
Krylov range finder (Musco & Musco 2015), which is written here only to test whether it beats power iterations on
these flat spectra. Errors as in bench_init.py (mean over layers). Median of ``--reps`` passes in one process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from subspace_peft.linalg import SVDSettings, subspace_error, truncated_svd_batched  # noqa: E402

from harness import markdown_table  # noqa: E402
from models import smollm2_path  # noqa: E402


def linear_weights() -> dict[str, torch.Tensor]:
    weights = load_file(os.path.join(smollm2_path(), "model.safetensors"))
    return {k: v.float() for k, v in weights.items() if v.ndim == 2 and "embed" not in k and "lm_head" not in k}


def block_krylov(w: torch.Tensor, rank: int, depth: int, block: int):
    generator = torch.Generator().manual_seed(0)
    blocks = [torch.linalg.qr(w @ torch.randn(w.shape[1], block, generator=generator)).Q]
    for _ in range(depth):
        y = w @ (w.T @ blocks[-1])
        basis = torch.cat(blocks, 1)
        for _ in range(2):  # block Gram-Schmidt, twice for stability
            y = y - basis @ (basis.T @ y)
        blocks.append(torch.linalg.qr(y).Q)
    q = torch.cat(blocks, 1)
    u_b, s, _ = torch.linalg.svd(q.T @ w, full_matrices=False)
    return (q @ u_b)[:, :rank], s[:rank]


def variants(rank: int) -> dict:
    out = {}
    for niter in (2, 4):
        out[f"PEFT svd_lowrank(q=r, niter={niter})"] = lambda ws, n=niter: [
            torch.svd_lowrank(w, rank, niter=n)[:2] for w in ws
        ]
    for niter, oversample in ((1, 16), (2, 0), (2, 8), (2, 16), (3, 8), (4, 0)):
        settings = SVDSettings(method="randomized", niter=niter, oversample=oversample)
        out[f"ours niter={niter} oversample={oversample}"] = lambda ws, s=settings: [
            t[:2] for t in truncated_svd_batched(ws, rank, s)
        ]
    for depth, block in ((1, 16), (2, 16)):
        out[f"block Krylov depth={depth} block={block}"] = lambda ws, d=depth, b=block: [
            block_krylov(w, rank, d, b) for w in ws
        ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    weights = linear_weights()
    names, tensors = list(weights), list(weights.values())
    exact = [torch.linalg.svd(w, full_matrices=False)[:2] for w in tensors]
    rows, reference = [], None
    for label, run in variants(args.rank).items():
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            found = run(tensors)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        reference = seconds if "niter=4)" in label else reference
        errors = [subspace_error(u_e[:, : args.rank], u) for (u_e, _), (u, _) in zip(exact, found)]
        shortfalls = [
            1 - s.pow(2).sum().item() / s_e[: args.rank].pow(2).sum().item() for (_, s_e), (_, s) in zip(exact, found)
        ]
        rows.append([label, seconds, statistics.mean(errors), statistics.mean(shortfalls)])
    print(f"{len(names)} weights, rank {args.rank}, median of {args.reps} passes")
    print(
        markdown_table(
            ["variant", "SVD s", "time / PEFT niter=4", "subspace error", "energy shortfall"],
            [[label, f"{s:.3f}", f"{s / reference:.2f}x", f"{e:.3f}", f"{sh:.4f}"] for label, s, e, sh in rows],
        )
    )


if __name__ == "__main__":
    main()
