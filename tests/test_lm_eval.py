"""lm-eval-harness evaluates our adapters with no code change: its ``hf`` model's ``peft=`` argument loads a saved
adapter of every method through peft, in processes that are never told to import subspace_peft (the start-up hook,
_subspace_peft_autoregister.py, registers our methods once peft is imported).

On the packaged SmolLM2-135M and a local multiple-choice task (tests/lm_eval_task: 32 arithmetic questions, three
choices, scored by log-likelihood), each method's trained-looking adapter is evaluated as a user would: one method by
the ``lm_eval`` command line, the others by ``lm_eval.simple_evaluate`` in one child process (imports take ~10 s a
process). Every document's per-choice log-likelihoods equal those of the merged model (``merge_and_unload``, saved
and evaluated as a plain model) within ``ATOL``, so both pick the same choice (but where two choices tie within
that gap) and the accuracies are equal up to those ties; and they differ from the base model's, so the adapter was
applied."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model

from subspace_peft import EffortConfig, FLoRAConfig, PiSSAConfig, SVFitConfig
from subspace_peft.packaged_models import smollm2_missing, smollm2_path

from readme_commands import readme_shell_commands
from tiny_models import perturb_trainable

pytestmark = pytest.mark.slow  # lm_eval processes on a 135M model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = "subspace_peft_arithmetic"
INCLUDE = "tests/lm_eval_task"  # relative, as a user types it: the task's data_files are relative to the repo root
ATOL = 1e-4  # absolute, per choice: the adapter's log-likelihoods against the merged model's (fp32)
TARGETS = ["q_proj", "v_proj"]
CONFIGS = {
    "pissa": lambda: PiSSAConfig(r=4, target_modules=TARGETS, task_type="CAUSAL_LM"),
    "svfit": lambda: SVFitConfig(r=4, target_modules=TARGETS, task_type="CAUSAL_LM"),
    "flora": lambda: FLoRAConfig(r=4, target_modules=TARGETS, task_type="CAUSAL_LM"),
    "effort": lambda: EffortConfig(residual_rank=4, target_modules=TARGETS, task_type="CAUSAL_LM"),
}
CLI_METHOD = "pissa"  # the command the README shows; the other methods go through the Python API
MISSING = smollm2_missing()

# one process, never told to import subspace_peft: every model of argv[1] (name -> model_args), one after another
API_CHILD = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager

runs, include, task = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
manager = TaskManager(include_path=include)
found = {}
for name, model_args in runs.items():
    result = lm_eval.simple_evaluate(
        model="hf", model_args=model_args, tasks=[task], task_manager=manager, device="cpu", batch_size=8,
        log_samples=True,
    )
    found[name] = {"acc": result["results"][task]["acc,none"], "samples": result["samples"][task]}
print("RESULTS " + json.dumps({"found": found, "imported_by_hook": "subspace_peft" in sys.modules}, default=str))
"""


def child_env() -> dict:
    """The test's environment (Hub off, this run's caches) less anything that would point a child at our code."""
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environment.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return environment


def loglikelihoods(samples: list) -> dict:
    """doc_id -> each choice's log-likelihood, from lm-eval's logged samples (the CLI's JSONL or the API's dicts)."""
    return {int(s["doc_id"]): [float(resp[0]) for resp in s["filtered_resps"]] for s in samples}


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def runner_up_margin(values: list[float]) -> float:
    best, second = sorted(values, reverse=True)[:2]
    return best - second


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """SmolLM2 as the base folder; each method's adapter (trainable tensors moved by a seeded step, as training
    would) and its merged model (loaded from the saved adapter, merge_and_unload, saved as a plain model)."""
    if MISSING:
        pytest.skip(f"needs the packaged SmolLM2-135M: {MISSING}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(base)
    root = tmp_path_factory.mktemp("lm_eval")
    for seed, (method, make) in enumerate(CONFIGS.items(), start=1):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), make())
        perturb_trainable(model, scale=0.05, seed=seed)
        model.save_pretrained(root / method)
        del model
        loaded = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), root / method
        )
        loaded.merge_and_unload().save_pretrained(root / f"{method}-merged")
        tokenizer.save_pretrained(root / f"{method}-merged")
        del loaded
    return base, root


def test_lm_eval_evaluates_every_method_as_its_merged_model_without_the_import(models):
    base, root = models
    env = child_env()

    # the README's command line, with its BASE and ADAPTER filled in (the console script next to this interpreter)
    out = root / "cli"
    (readme,) = [words for words in readme_shell_commands() if words[0] == "lm_eval"]
    command = [os.path.join(os.path.dirname(sys.executable), "lm_eval")]
    command += [w.replace("BASE", str(base)).replace("ADAPTER", str(root / CLI_METHOD)) for w in readme[1:]]
    assert f"--tasks {TASK} --include_path {INCLUDE}" in " ".join(command)
    command += ["--output_path", str(out), "--log_samples"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    (results_file,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    (samples_file,) = glob.glob(str(out / "**" / f"samples_{TASK}_*.jsonl"), recursive=True)
    with open(results_file) as handle:
        cli_acc = json.load(handle)["results"][TASK]["acc,none"]
    with open(samples_file) as handle:
        cli_samples = [json.loads(line) for line in handle]

    # the rest in one process: the base model, the other adapters, every merged model
    runs = {"base": f"pretrained={base},dtype=float32"}
    runs.update({m: f"pretrained={base},peft={root / m},dtype=float32" for m in CONFIGS if m != CLI_METHOD})
    runs.update({f"{m}-merged": f"pretrained={root / f'{m}-merged'},dtype=float32" for m in CONFIGS})
    proc = subprocess.run(
        [sys.executable, "-c", API_CHILD, json.dumps(runs), INCLUDE, TASK],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    report = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULTS "))[8:])
    assert report["imported_by_hook"] is True
    found = report["found"]
    found[CLI_METHOD] = {"acc": cli_acc, "samples": cli_samples}

    base_ll = loglikelihoods(found["base"]["samples"])
    assert len(base_ll) == 32
    summary = {"base": found["base"]["acc"]}
    for method in CONFIGS:
        adapter, merged = loglikelihoods(found[method]["samples"]), loglikelihoods(found[f"{method}-merged"]["samples"])
        assert adapter.keys() == merged.keys() == base_ll.keys()
        gap = max(abs(a - b) for doc in adapter for a, b in zip(adapter[doc], merged[doc]))
        assert gap <= ATOL, (method, gap)
        # the same choice wherever the merged model's best choice leads its runner-up by more than the gap allows to
        # flip; a document within 2 * gap of a tie may go either way (seen once: Effort, one of 32 documents)
        ties = [doc for doc, lls in merged.items() if runner_up_margin(lls) <= 2 * gap]
        assert len(ties) <= 2, (method, ties)
        decided = [doc for doc in merged if doc not in ties]
        assert [argmax(adapter[doc]) for doc in decided] == [argmax(merged[doc]) for doc in decided], method
        acc_gap = abs(found[method]["acc"] - found[f"{method}-merged"]["acc"])
        assert acc_gap <= len(ties) / len(merged) + 1e-9, (method, acc_gap, ties)
        moved = max(abs(a - b) for doc in adapter for a, b in zip(adapter[doc], base_ll[doc]))
        assert moved > 100 * ATOL, (method, moved)  # the adapter was applied, not ignored
        summary[method] = {"adapter": found[method]["acc"], "merged": found[f"{method}-merged"]["acc"]}
        summary[method].update(max_gap_to_merged=gap, max_change_from_base=moved)
    print("lm-eval accuracies:", json.dumps(summary))
