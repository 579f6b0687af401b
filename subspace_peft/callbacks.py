"""transformers/TRL Trainer callback for methods with a regulariser (Effort): it logs the regulariser beside the task
loss and counts it once per optimizer step, whatever the gradient accumulation and fp16 loss scaling."""

from __future__ import annotations

from accelerate.utils import extract_model_from_parallel
from transformers import TrainerCallback


def regularised_tuner(model):
    """The tuner of ``model`` (a PeftModel, possibly wrapped by DDP, DeepSpeed or torch.compile) that has a
    regulariser, or None."""
    tuner = getattr(extract_model_from_parallel(model), "base_model", None)
    return tuner if hasattr(tuner, "start_optimizer_step") else None


def _loss_scale(optimizer) -> float:
    """fp16 mixed precision scales the loss (and so the task gradient) by the GradScaler's scale; the regulariser's
    gradient must be scaled alike, as unscaling divides every gradient by it. accelerate keeps the scaler on its
    AcceleratedOptimizer."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is not None and scaler.is_enabled():
        return float(scaler.get_scale())
    return 1.0


class RegulariserCallback(TrainerCallback):
    """Adds ``effort_loss`` (the weighted regulariser), ``effort_orth`` and ``effort_norm`` (unweighted) to every log
    (mean per optimizer step since the last log), and makes the regulariser count once per optimizer step, at the
    fp16 loss scale when there is one. Register it with :func:`add_regulariser_callback`, which puts it first so the
    progress bar, ``report_to`` integrations and ``trainer.state.log_history`` all see the values."""

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        tuner = regularised_tuner(model)
        if tuner is not None:
            tuner.start_optimizer_step(_loss_scale(optimizer))

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        tuner = regularised_tuner(model)
        if tuner is None or logs is None or "loss" not in logs:  # training logs only, not evaluation results
            return
        values = tuner.pop_regulariser_log()
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)  # Trainer.log records the entry before callbacks see it

    def on_train_end(self, args, state, control, model=None, **kwargs):
        tuner = regularised_tuner(model)
        if tuner is not None:
            tuner.regularise_every_pass()


def add_regulariser_callback(trainer) -> RegulariserCallback:
    """Registers a :class:`RegulariserCallback` on ``trainer`` (transformers' Trainer or any TRL trainer), ahead of
    the others, and returns it. The regulariser's gradient reaches the parameters without it; the callback logs it
    and keeps its weight right under gradient accumulation and fp16."""
    if regularised_tuner(trainer.model) is None:
        raise ValueError(
            "add_regulariser_callback: the trainer's model has no regulariser (only Effort adapters have "
            "one); leave the callback out for this method"
        )
    callback = RegulariserCallback()
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
