"""Share an adapter through the Hugging Face Hub: ``subspace_peft.push_adapter`` pushes a PiSSA adapter with a model
card and ``lora/``, its exact plain-LoRA export. A separate Python process that never imports subspace_peft then loads
that export with plain peft, ``PeftModel.from_pretrained(base, repo_id, subfolder="lora")``, and checks that its
outputs equal the pushed model's.

The Hub is the one ``HF_ENDPOINT`` names (default huggingface.co; log in or set ``HF_TOKEN``). The base model is a tiny
Llama built and saved here; ``--base-model-id`` is the Hub id written into the card, as push_adapter requires for a
base loaded from a local folder (for a real model: the id it was downloaded from).

    python examples/push_and_load.py --repo-id you/tiny-llama-pissa [--base-model-id you/tiny-llama] [--steps 5]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from huggingface_hub import HfApi
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

INPUT_IDS = torch.arange(24).reshape(2, 12) % 96  # the input both processes compare outputs on


def push(args) -> dict:
    import subspace_peft  # imported here only: the --load process must run without it

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(args.base)
    base = AutoModelForCausalLM.from_pretrained(args.base)
    model = get_peft_model(base, subspace_peft.PiSSAConfig(r=4, lora_alpha=4, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(args.steps):  # a few steps on a fixed sequence, so the adapter changes the outputs
        model(input_ids=INPUT_IDS, labels=INPUT_IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        save_file({"logits": model.eval()(input_ids=INPUT_IDS).logits}, args.expected)
    summary = {"steps": args.steps, "learning rate": 1e-2, "data": "one fixed token sequence (a demo)"}
    url = subspace_peft.push_adapter(model, args.repo_id, training_summary=summary, base_model=args.base_model_id)
    print(f"pushed: {url}")
    return {"files": sorted(sibling.rfilename for sibling in HfApi().model_info(args.repo_id).siblings)}


def load(args) -> dict:
    """Runs in its own process: plain peft and transformers, no subspace_peft."""
    base = AutoModelForCausalLM.from_pretrained(args.base)
    model = PeftModel.from_pretrained(base, args.repo_id, subfolder="lora").eval()  # a LoraConfig: plain peft
    with torch.no_grad():
        logits = model(input_ids=INPUT_IDS).logits
        with model.disable_adapter():
            base_logits = model(input_ids=INPUT_IDS).logits
    expected = load_file(args.expected)["logits"]
    return {
        "peft_type": str(model.peft_config["default"].peft_type.value),
        "subspace_peft_imported": "subspace_peft" in sys.modules,
        "max_abs_diff": (logits - expected).abs().max().item(),
        "adapter_effect": (logits - base_logits).abs().max().item(),
    }


def main(work: str) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split(":")[0])
    parser.add_argument("--repo-id", default="demo-user/tiny-llama-pissa", help="the adapter's Hub repo (yours)")
    parser.add_argument("--base-model-id", default="demo-user/tiny-llama", help="the base model's Hub id, for the card")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--load", action="store_true", help="(internal) the loading process")
    parser.add_argument("--base", help="(internal) the base model folder")
    parser.add_argument("--expected", help="(internal) the pushed model's outputs")
    args = parser.parse_args()
    if args.load:
        print(json.dumps(load(args)))
        return 0
    args.base, args.expected = f"{work}/base", f"{work}/expected.safetensors"
    pushed = push(args)
    print("files on the Hub:", ", ".join(pushed["files"]))
    child = ["--load", "--repo-id", args.repo_id, "--base", args.base, "--expected", args.expected]
    # as on a machine without subspace-peft: installed, it registers itself whenever a process imports peft
    plain = {**os.environ, "SUBSPACE_PEFT_AUTOREGISTER": "0"}
    run = subprocess.run([sys.executable, __file__, *child], capture_output=True, text=True, env=plain)
    if run.returncode != 0:
        print(run.stdout, run.stderr, file=sys.stderr)
        return 1
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"loaded in a process without subspace_peft ({loaded['peft_type']}): max |logits difference| = "
          f"{loaded['max_abs_diff']:.2e}; the adapter moves the logits by {loaded['adapter_effect']:.2e}")  # fmt: skip
    ok = not loaded["subspace_peft_imported"] and loaded["max_abs_diff"] <= 1e-5 and loaded["adapter_effect"] > 1e-3
    ok = ok and "lora/adapter_model.safetensors" in pushed["files"]
    print(json.dumps({**loaded, "files": pushed["files"], "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="push_and_load_") as work:  # the base model and expected outputs
        code = main(work)
    sys.exit(code)
