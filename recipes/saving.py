"""Phase 6 of recipes/finetune.py: save the adapter, loss.png and metrics.json, push if asked, say where they went."""

from __future__ import annotations

import inspect
import json
import os
from typing import Optional

import subspace_peft
from subspace_peft.recipe_tools.config import RecipeError


def hub_base_model(recipe) -> Optional[str]:
    """The Hub id a pushed adapter names as its base model: ``hub_base_model``, else the packaged SmolLM2's Hub id,
    else ``model`` when it is a Hub id; None for a local folder without ``hub_base_model``."""
    from subspace_peft.packaged_models import SMOLLM2_HUB_ID

    if recipe.hub_base_model:
        return recipe.hub_base_model
    if recipe.model == "smollm2":
        return SMOLLM2_HUB_ID
    return None if os.path.exists(recipe.model) else recipe.model


def push_arguments(recipe) -> dict:
    """``subspace_peft.push_adapter``'s keyword arguments for the Hub fields, checked before anything trains."""
    base_model = hub_base_model(recipe)
    if base_model is None:
        raise RecipeError(
            f"push_to_hub: the model {recipe.model} is a local folder, and a pushed adapter names its "
            "base model by Hub id; fix: pass --hub_base_model <the Hub id of the model in that folder>",
            key="push_to_hub",
        )
    wanted = {"base_model": base_model, "license": recipe.hub_license, "datasets": recipe.hub_datasets}
    accepted = inspect.signature(subspace_peft.push_adapter).parameters
    given = {"base_model": recipe.hub_base_model, "license": recipe.hub_license, "datasets": recipe.hub_datasets}
    refused = [name for name, value in given.items() if value is not None and name not in accepted]
    if refused:
        raise RecipeError(
            f"push_to_hub: this subspace_peft's push_adapter takes no {refused} argument; fix: update "
            f"subspace-peft, or leave out {', '.join('--hub_' + n.split('_')[0] for n in refused)}",
            key="push_to_hub",
        )
    # the derived base model id goes where push_adapter takes it; an older one reads it from the model config
    return {name: value for name, value in wanted.items() if value is not None and name in accepted}


def training_summary(recipe, trainer, metrics: dict) -> dict:
    """The model card's training section: data, steps, rate, batch, quantisation, the metrics before and after."""
    before, after, args = metrics["before"], metrics["after"], trainer.args
    return {
        "data": recipe.dataset,
        "steps": trainer.state.global_step,
        "trainer": recipe.trainer,
        "learning rate": args.learning_rate,
        "batch size per device": args.per_device_train_batch_size,
        "quantization": recipe.quantization,
        "eval loss before / after": f"{before['eval_loss']:.4f} / {after['eval_loss']:.4f}",
        "exact match before / after": f"{before['exact_match']:.3f} / {after['exact_match']:.3f}",
    }


def save_and_push(recipe, trainer, model, metrics: dict, push: Optional[dict]) -> None:
    """adapter/ (with our model card as its README.md), loss.png and metrics.json in ``output_dir`` (process 0), and
    the push to the Hub if asked."""
    # under FSDP every rank takes part in gathering the sharded adapter (FSDP2: get_model_state_dict, full)
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped) if trainer.is_fsdp_enabled else None
    if not trainer.is_world_process_zero():
        return
    adapter_dir = os.path.join(recipe.output_dir, "adapter")
    model.save_pretrained(adapter_dir, state_dict=state_dict)
    summary = training_summary(recipe, trainer, metrics)
    # peft's save_pretrained writes its empty template; the card names the Hub id of the base where one is known
    card = subspace_peft.model_card(model, adapter_dir, training_summary=summary, base_model=hub_base_model(recipe))
    with open(os.path.join(adapter_dir, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(card)
    save_loss_curve(trainer.state.log_history, os.path.join(recipe.output_dir, "loss.png"))
    with open(os.path.join(recipe.output_dir, "metrics.json"), "w") as handle:
        json.dump(metrics, handle, indent=2)
    if recipe.push_to_hub:
        url = subspace_peft.push_adapter(model, recipe.push_to_hub, training_summary=summary, **(push or {}))
        print(f"pushed: {url}")


def saved_weights(trainer) -> str:
    """Which weights the adapter holds: the Trainer's convention (the last step's, or with load_best_model_at_end
    the best checkpoint's by metric_for_best_model)."""
    state, args = trainer.state, trainer.args
    if args.load_best_model_at_end and state.best_model_checkpoint:
        metric = args.metric_for_best_model or "loss"
        return (
            f"the best checkpoint by eval {metric} ({os.path.basename(state.best_model_checkpoint)}, "
            "load_best_model_at_end)"
        )
    return (
        f"the last step's (step {state.global_step}; for the best checkpoint instead set load_best_model_at_end: "
        "true with eval_strategy and save_strategy steps)"
    )


def report(recipe, trainer, metrics: dict) -> str:
    """What the run did and where it went, with the lines that load the adapter (printed at the end of a run)."""
    adapter_dir = os.path.join(os.path.abspath(recipe.output_dir), "adapter")
    before, after = metrics["before"], metrics["after"]
    ours = not recipe.record.peft_builtin
    lines = [
        "",
        f"output folder: {os.path.abspath(recipe.output_dir)} (loss.png, metrics.json, checkpoint-*/)",
        f"adapter:       {adapter_dir}",
        f"               holds {saved_weights(trainer)}",
        f"eval loss:     {before['eval_loss']:.4f} -> {after['eval_loss']:.4f} (held-out answers)",
        f"exact match:   {before['exact_match']:.3f} -> {after['exact_match']:.3f}",
        "load it:",
        *(["    import subspace_peft  # registers the method with peft"] if ours else []),
        "    from peft import AutoPeftModelForCausalLM",
        f'    model = AutoPeftModelForCausalLM.from_pretrained("{adapter_dir}")',
    ]
    return "\n".join(lines)


def save_loss_curve(log_history: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in log_history if "loss" in e]
    losses = [e["loss"] for e in log_history if "loss" in e]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(steps, losses, label="train")
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    if evals:
        axis.plot(*zip(*evals), "o-", label="eval")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
