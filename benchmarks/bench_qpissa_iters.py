"""Quantisation error at init of QLoRA, QPiSSA (residual_quant_iters k=1 and k=5) and LoftQ, on MiniLM-L6's attention
projections (query, key, value of its 6 layers: 18 weights of 384 x 384), for nf4 and int8 at r=16 and r=64.

    python benchmarks/bench_qpissa_iters.py [--ranks 16 64] [--kinds nf4 int8]

Each method approximates ``W`` by what the model computes with at init: QLoRA ``deq(Q(W))``; QPiSSA
``deq(Q(W - s B A)) + s B A`` with ``(A, B)`` from ``subspace_peft``'s own init (``alternating_factors``: k=1 is
plain QPiSSA, k=5 alternates SVD and quantisation, LoftQ's Algorithm 1 started from PiSSA's factors); LoftQ
``deq(Q_T) + L R`` after T=5 iterations of peft's ``loftq_init`` (starting from ``Q(W)``). peft's ``loftq_init``
computes on CUDA (or XPU) only; on a CPU-only machine its exact steps (same bitsandbytes calls: nf4 without double
quantisation, int8 vector-wise, full SVD) are re-run here on the CPU, and the table says so. Errors are summed over
the 18 weights: the relative Frobenius error ``||W - W_hat||_F / ||W||_F`` and the nuclear-norm error
``||W - W_hat||_*`` (what ``bench_quality.py`` reports for SmolLM2). CPU: ~20 s on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def _loftq_cpu(weight: torch.Tensor, num_bits: int, reduced_rank: int, num_iter: int):
    """peft.utils.loftq_utils.loftq_init's loop with compute_device='cpu' (peft hard-codes cuda/xpu)."""
    import bitsandbytes as bnb

    res = weight.clone()
    for i in range(num_iter):
        if num_bits == 4:
            qweight = bnb.nn.Params4bit(res, requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
            dequantized = bnb.functional.dequantize_4bit(qweight.data, qweight.quant_state)
        else:
            qweight = bnb.nn.Int8Params(res, requires_grad=False).to("cpu")
            dequantized = bnb.functional.int8_vectorwise_dequant(qweight.data, qweight.SCB)
        res = weight - dequantized
        u, s, vh = torch.linalg.svd(res, full_matrices=False)
        low_rank = (u[:, :reduced_rank] * s[:reduced_rank]) @ vh[:reduced_rank]
        if i + 1 == num_iter:
            break
        res = weight - low_rank
    return dequantized.float(), low_rank


def loftq(weight: torch.Tensor, kind: str, rank: int, iters: int) -> tuple[torch.Tensor, str]:
    bits = 4 if kind == "nf4" else 8
    if torch.cuda.is_available():
        from peft.utils.loftq_utils import loftq_init

        dequantized, lora_a, lora_b = loftq_init(weight.cuda(), num_bits=bits, reduced_rank=rank, num_iter=iters)
        return (dequantized.float() + lora_b @ lora_a).cpu(), "peft loftq_init (CUDA)"
    dequantized, low_rank = _loftq_cpu(weight, bits, rank, iters)
    return dequantized + low_rank, "peft loftq_init's steps re-run on CPU"


def errors(weight: torch.Tensor, approx: torch.Tensor) -> tuple[float, float]:
    diff = weight - approx
    return (
        (torch.linalg.matrix_norm(diff) / torch.linalg.matrix_norm(weight)).item(),
        torch.linalg.matrix_norm(diff, ord="nuc").item(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--kinds", nargs="+", default=["nf4", "int8"])
    args = parser.parse_args()

    from subspace_peft.linalg import truncated_svd
    from subspace_peft.linalg.settings import SVDSettings
    from subspace_peft.tuners.pissa.model import pissa_factors
    from subspace_peft.tuners.pissa.quant_iters import alternating_factors, quant_dequant

    from tiny_models import minilm

    model = minilm()
    weights = {
        name: module.weight.detach().float().clone()
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in ("query", "key", "value")
    }
    rows, loftq_source, started = [], "", time.perf_counter()
    for kind in args.kinds:
        for rank in args.ranks:
            totals: dict[str, list[float]] = {}
            for weight in weights.values():
                linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
                linear.weight.data.copy_(weight)
                results = {"QLoRA": quant_dequant(linear, weight, kind)}
                first = pissa_factors(*truncated_svd(weight, rank), scaling=1.0)
                for k in (1, 5):
                    a, b = alternating_factors(linear, first, 1.0, kind, k, SVDSettings())
                    results[f"QPiSSA k={k}"] = quant_dequant(linear, weight - b @ a, kind) + b @ a
                results["LoftQ T=5"], loftq_source = loftq(weight, kind, rank, 5)
                for method, approx in results.items():
                    frob, nuc = errors(weight, approx)
                    total = totals.setdefault(method, [0.0, 0.0])
                    total[0] += frob
                    total[1] += nuc
            qlora = totals["QLoRA"]
            for method, (frob, nuc) in totals.items():
                rows.append(f"| {kind} | {rank} | {method} | {frob:.3f} | {nuc:.1f} | {nuc / qlora[1]:.3f} |")
    print(f"MiniLM-L6 query/key/value ({len(weights)} weights of 384 x 384), scale s=1; LoftQ: {loftq_source}\n")
    print("| quant | r | method | sum of relative Frobenius error | sum of nuclear-norm error | nuclear / QLoRA |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
