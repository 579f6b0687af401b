"""The ``subspace-peft`` command. One subcommand per task; ``init`` writes an adapter's initial state straight from a
checkpoint on disk (:func:`subspace_peft.init_adapter`), without loading the model; ``export`` writes a saved
adapter's exact plain-LoRA form (:func:`subspace_peft.export_lora`), which loads and serves without this package::

    subspace-peft init --model PATH_OR_HUB_ID --config method.yaml --out DIR [--device cpu|cuda] [--overwrite]
    subspace-peft export ADAPTER_DIR OUT_DIR [--base PATH_OR_HUB_ID]

The YAML file holds the method and its config fields, either as the recipes write them (``method: pissa`` and
``method_config: {r: 16, ...}``; other recipe keys are ignored, so ``recipes/configs/pissa.yaml`` works as is) or
flat (``method: pissa``, ``r: 16``, ``target_modules: all-linear``, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Optional, Sequence


def load_method_config(path: str):
    """The method config a YAML file describes (see the module docstring)."""
    try:
        import yaml
    except ImportError as error:
        raise ValueError(
            "reading a YAML config needs pyyaml: pip install 'subspace-peft[train]' (or pip install pyyaml)"
        ) from error
    from .methods import METHODS

    if not os.path.isfile(path):
        raise ValueError(f"config file '{path}' does not exist")
    with open(path) as handle:
        data = yaml.safe_load(handle)
    if not isinstance(data, dict) or "method" not in data:
        raise ValueError(
            f"{path} must be a YAML mapping with a 'method' key (e.g. method: pissa) and the method's fields, flat or "
            "under method_config (as recipes/configs/*.yaml write them)"
        )
    ours = {method.name: method for method in METHODS if not method.peft_builtin}
    name = str(data["method"]).lower()
    if name not in ours:
        raise ValueError(
            f"{path}: method {data['method']!r} has no offline init; choose one of {sorted(ours)} (peft's own methods, "
            "such as LoRA, start from a random init: use get_peft_model)"
        )
    config_cls = ours[name].config_cls
    if "method_config" in data:
        fields = data["method_config"] or {}
        where = "method_config"
    else:
        fields = {key: value for key, value in data.items() if key != "method"}
        where = "the file's keys"
    if not isinstance(fields, dict):
        raise ValueError(f"{path}: {where} must be a mapping of {config_cls.__name__} fields, got {fields!r}")
    known = {field.name for field in dataclasses.fields(config_cls) if field.init}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(
            f"{path}: {unknown} in {where} are not {config_cls.__name__} fields; its fields include "
            f"{sorted(known - {'peft_type', 'revision', 'base_model_name_or_path', 'inference_mode'})}"
        )
    return config_cls(**fields)


def _init(args: argparse.Namespace) -> int:
    from .offline_init import init_adapter

    config = load_method_config(args.config)
    out = init_adapter(
        args.model,
        config,
        args.out,
        device=args.device,
        dtype=args.dtype,
        overwrite=args.overwrite,
        revision=args.revision,
        seed=args.seed,
    )
    print(f"wrote the initial {type(config).__name__.removesuffix('Config')} adapter of {args.model} to {out}")
    return 0


# the transformers class a saved adapter's task_type loads its base model with (peft's AutoPeftModel* choose the same)
_TASK_MODEL_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}


def _saved_config(adapter_dir: str):
    """The saved adapter's config, checked to be one of ours with an exact LoRA form (ValueError otherwise)."""
    from peft import PeftConfig

    from .methods import METHODS

    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise ValueError(f"{adapter_dir} holds no adapter_config.json: pass the folder save_pretrained wrote")
    config = PeftConfig.from_pretrained(adapter_dir)
    peft_type = getattr(config.peft_type, "value", config.peft_type)
    ours = {method.config_cls.__name__ for method in METHODS if not method.peft_builtin}
    if type(config).__name__ not in ours:
        raise ValueError(
            f"{adapter_dir} is a {peft_type} adapter, peft's own: it loads without this package already, there is "
            "nothing to export"
        )
    bias = getattr(config, "bias", "none")
    if bias != "none":
        raise ValueError(
            f"{adapter_dir} trains biases (bias={bias!r}), which a LoRA adapter cannot hold: merge it instead "
            "(merge_and_unload), or train with bias='none'"
        )
    if getattr(config, "residual_quantization", None):
        raise ValueError(
            f"{adapter_dir} is a QPiSSA adapter: its LoRA form belongs on the quantised residual base, which only the "
            "loaded model holds; in Python, PeftModel.from_pretrained(base, dir) then subspace_peft.export_lora(model, "
            "out) and serve it on model.get_base_model()"
        )
    return config


def _export(args: argparse.Namespace) -> int:
    out = args.out_dir
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"{out} already exists and is not an empty folder: choose a new OUT_DIR or remove it")
    config = _saved_config(args.adapter_dir)
    base_id = args.base or config.base_model_name_or_path
    if not base_id:
        raise ValueError(f"{args.adapter_dir}/adapter_config.json names no base model: pass --base PATH_OR_HUB_ID")
    import transformers
    from peft import PeftModel

    from .export import export_lora

    task = getattr(config.task_type, "value", config.task_type)
    model_class = getattr(transformers, _TASK_MODEL_CLASSES.get(task, "AutoModel"))
    try:
        base = model_class.from_pretrained(base_id)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"the base model {base_id!r} could not be loaded ({first_line}); pass --base with the folder or Hub id of "
            "the model this adapter was trained on"
        ) from None
    model = PeftModel.from_pretrained(base, args.adapter_dir)  # a load: no SVD
    created = not os.path.exists(out)
    try:
        lora = export_lora(model, out)
    except ValueError:
        if created and os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)
        raise
    ranks = sorted(set(lora.rank_pattern.values()) or {lora.r})
    print(
        f"wrote the plain-LoRA form of {args.adapter_dir} ({getattr(config.peft_type, 'value', config.peft_type)}) to "
        f"{out}: rank {'/'.join(map(str, ranks))}, loads without subspace-peft with "
        f"PeftModel.from_pretrained(base, {out!r}); vLLM needs max_lora_rank >= {max(ranks)}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="subspace-peft", description="subspace-peft command-line tools")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    init = commands.add_parser(
        "init",
        help="write an adapter's initial state from a checkpoint on disk, one weight in memory at a time",
        description=(
            "Write the adapter get_peft_model(model, config) would start from (PiSSA, SVFit, Effort, FLoRA) straight "
            "from a safetensors checkpoint, without loading the model: peak memory is about one weight. The folder "
            "loads with PeftModel.from_pretrained(base, DIR, is_trainable=True)."
        ),
    )
    init.add_argument("--model", required=True, help="model folder (config.json + *.safetensors) or Hub repo id")
    init.add_argument("--config", required=True, help="YAML with 'method' and its fields (recipes/configs/*.yaml)")
    init.add_argument("--out", required=True, help="adapter folder to write (must not exist, or be empty)")
    init.add_argument("--device", choices=["cpu", "cuda"], help="where the SVDs run (default: cuda if available)")
    init.add_argument("--dtype", help="dtype the model would be loaded in (default: auto, as transformers loads it)")
    init.add_argument("--revision", help="Hub revision of --model")
    init.add_argument("--seed", type=int, help="FLoRA's random init: seed the RNG as torch.manual_seed would")
    init.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    init.set_defaults(run=_init)
    export = commands.add_parser(
        "export",
        help="write a saved adapter's exact plain-LoRA form, which loads and serves (vLLM) without this package",
        description=(
            "Load ADAPTER_DIR (a folder save_pretrained wrote; no SVD runs) onto its base model and write the same "
            "update as a plain LoRA adapter to OUT_DIR (PiSSA: rank 2r; SVFit: r; Effort: 2 x residual_rank; FLoRA: "
            "min(r_out, r_in)). The outputs of base + export equal base + adapter."
        ),
    )
    export.add_argument("adapter_dir", help="the saved adapter (adapter_config.json + adapter_model.safetensors)")
    export.add_argument("out_dir", help="the LoRA folder to write (must not exist, or be empty)")
    export.add_argument(
        "--base", help="the base model (folder or Hub id), when it is not where adapter_config.json says"
    )
    export.set_defaults(run=_export)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``subspace-peft`` with ``argv`` (default: the command line); returns the exit status (errors: 1, with the
    message on stderr)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:
        print(f"subspace-peft {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
