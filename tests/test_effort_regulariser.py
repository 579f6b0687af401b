"""Effort's regulariser reaches the gradient whatever computes the loss (a hand-written loop, gradient checkpointing,
transformers' Trainer, TRL's SFTTrainer), counts once per optimizer step under gradient accumulation, follows the
fp16 loss scale, and is logged by the callback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from test_finetune_recipe import tiny_model  # noqa: F401  (fixture: a tiny Llama with a BERT tokenizer)
from transformers import Trainer, TrainingArguments

import subspace_peft
from subspace_peft import EffortConfig, EffortModel, RegulariserCallback, add_regulariser_callback

from tiny_models import build, perturb_trainable

# gradients are compared as relative Frobenius errors over all trainable tensors at once
GRAD_TOL = 1e-5


@pytest.fixture(params=["batched", "per_layer"])
def mode(request, monkeypatch):
    """Both ways the regulariser is tied: batched before the pass (the default), or by each layer in its forward
    (what FSDP2 and DeepSpeed ZeRO-3 use, where weights are whole only there)."""
    if request.param == "per_layer":
        monkeypatch.setattr(subspace_peft.tuners.effort.model, "_whole_only_in_forward", lambda layer: True)
    return request.param


def _effort(orth_weight=3.0, norm_weight=2.0, seed=1):
    torch.manual_seed(0)
    model = get_peft_model(
        build("gpt2"),
        EffortConfig(
            residual_rank=2,
            target_modules=["c_attn", "c_proj", "c_fc"],
            orth_weight=orth_weight,
            norm_weight=norm_weight,
        ),
    )
    perturb_trainable(model, scale=0.1, seed=seed)  # away from init, where the regularisers' gradients are zero
    return model


def _batch(seed=0, rows=4):
    ids = torch.randint(0, 64, (rows, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _hand_loss(model, batch):
    logits = model(input_ids=batch["input_ids"]).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))


def _grads(model):
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def _reference_grads(model, loss_fn, regulariser_times=1.0):
    """Gradient of loss_fn() + regulariser_times * subspace_loss(), computed in eval mode (no regulariser tied)."""
    was_training = model.training
    model.eval()
    loss = loss_fn() + regulariser_times * model.base_model.subspace_loss()
    loss.backward()
    model.train(was_training)
    return _grads(model)


def _relative_error(grads, reference):
    num = sum((grads[n] - reference[n]).pow(2).sum() for n in reference)
    den = sum(reference[n].pow(2).sum() for n in reference)
    return float((num / den).sqrt())


def _regulariser_grad_norm(model):
    model.zero_grad(set_to_none=True)
    model.base_model.subspace_loss().backward()
    grads = _grads(model)
    return float(sum(g.pow(2).sum() for g in grads.values()).sqrt())


def test_a_hand_written_cross_entropy_gets_the_regulariser_gradient(mode):
    model = _effort()
    assert _regulariser_grad_norm(model) > 1e-2, "the regulariser must move the gradient for the test to mean anything"
    batch = _batch()
    model.train()
    _hand_loss(model, batch).backward()
    grads = _grads(model)
    reference = _reference_grads(model, lambda: _hand_loss(model, batch))
    assert _relative_error(grads, reference) <= GRAD_TOL
    task_only = _reference_grads(model, lambda: _hand_loss(model, batch), regulariser_times=0.0)
    assert _relative_error(grads, task_only) > 1e-2


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_ties_the_regulariser_once(use_reentrant, mode):
    model = _effort()
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.enable_input_require_grads()
    batch = _batch()
    model.train()
    model(**batch).loss.backward()
    grads = _grads(model)
    assert model.base_model.pop_regulariser_log()["effort_loss"] == pytest.approx(
        model.base_model.subspace_loss().item(), rel=1e-5
    )
    reference = _reference_grads(model, lambda: model(**batch).loss)
    assert _relative_error(grads, reference) <= GRAD_TOL


def test_gradient_accumulation_counts_the_regulariser_once_per_optimizer_step(mode):
    model = _effort()
    batches = [_batch(seed) for seed in range(3)]
    model.train()
    model.base_model.start_optimizer_step()
    for batch in batches:
        (model(**batch).loss / len(batches)).backward()
    grads = _grads(model)
    reference = _reference_grads(model, lambda: sum(model(**b).loss for b in batches) / len(batches))
    assert _relative_error(grads, reference) <= GRAD_TOL
    model.base_model.regularise_every_pass()  # back to the default: each pass ties it
    model(**batches[0]).loss.backward()
    assert _relative_error(_grads(model), _reference_grads(model, lambda: model(**batches[0]).loss)) <= GRAD_TOL


def test_the_fp16_loss_scale_reaches_the_regulariser_too(mode):
    class Scaler:  # what accelerate's AcceleratedOptimizer carries under fp16
        def is_enabled(self):
            return True

        def get_scale(self):
            return 1024.0

    class Optimizer:
        scaler = Scaler()

    model = _effort()
    batch = _batch()
    model.train()
    RegulariserCallback().on_step_begin(None, None, None, model=model, optimizer=Optimizer())
    (1024.0 * model(**batch).loss).backward()
    grads = _grads(model)
    reference = _reference_grads(model, lambda: 1024.0 * model(**batch).loss, regulariser_times=1024.0)
    assert _relative_error(grads, reference) <= GRAD_TOL
    with pytest.raises(ValueError, match="grad_scale must be"):
        model.base_model.start_optimizer_step(float("nan"))


def _rows(count=16):
    return [{k: v[i] for k, v in _batch(seed).items()} for seed in range(count // 4) for i in range(4)]


def _trainer(tmp_path, model, **kwargs):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        learning_rate=3e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
        **kwargs,
    )
    return Trainer(model=model, args=args, train_dataset=_rows())


def test_trainer_with_gradient_accumulation_logs_the_regulariser_once_per_step(tmp_path, monkeypatch):
    model = _effort()
    computed = []
    batched = EffortModel._adapter_losses
    monkeypatch.setattr(
        EffortModel, "_adapter_losses", lambda self, *args: computed.append(self) or batched(self, *args)
    )
    trainer = _trainer(tmp_path, model, max_steps=4, gradient_accumulation_steps=2, logging_steps=1)
    callback = add_regulariser_callback(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    before = model.base_model.subspace_loss().item()
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 4 and all({"effort_loss", "effort_orth", "effort_norm"} <= set(entry) for entry in logged)
    assert logged[0]["effort_loss"] == pytest.approx(before, rel=1e-4)  # the first step's value, before it moved
    assert all(entry["effort_loss"] > 0 for entry in logged)
    # 4 steps x 2 micro-batches: the regulariser was computed in 4 passes (once per step), not 8
    assert len(computed) == 1 + 4  # 1: `before` above
    assert model.base_model._regulariser_every_pass  # on_train_end restored the default


def test_trainer_without_the_callback_warns_that_the_regulariser_is_not_logged(tmp_path):
    trainer = _trainer(tmp_path, _effort(), max_steps=1)
    with pytest.warns(UserWarning, match=r"add_regulariser_callback\(trainer\)"):
        trainer.train()


def test_the_callback_refuses_a_model_without_a_regulariser(tmp_path):
    lora = get_peft_model(build("gpt2"), LoraConfig(r=2, target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="only Effort adapters have one"):
        add_regulariser_callback(_trainer(tmp_path, lora, max_steps=1))


def test_trl_sft_trainer_gets_the_regulariser_gradient_and_logs_it(tiny_model, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.eos_token = tokenizer.sep_token  # a BERT tokenizer has no EOS; TRL appends one to each text
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = get_peft_model(base, EffortConfig(residual_rank=2, target_modules="all-linear", orth_weight=3.0))
    perturb_trainable(model, scale=0.1)
    texts = [f"the number {i} is followed by {i + 1}" for i in range(16)]
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
        max_length=32,
    )
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}), processing_class=tokenizer
    )
    add_regulariser_callback(trainer)
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    trainer.compute_loss(model, batch).backward()
    grads = _grads(model)
    reference = _reference_grads(model, lambda: trainer.compute_loss(model, batch))
    assert _relative_error(grads, reference) <= GRAD_TOL
    task_only = _reference_grads(model, lambda: trainer.compute_loss(model, batch), regulariser_times=0.0)
    assert _relative_error(grads, task_only) > 1e-3
    model.base_model.pop_regulariser_log()
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3 and all(entry["effort_loss"] > 0 for entry in logged)
    assert subspace_peft.callbacks.regularised_tuner(trainer.model) is model.base_model
