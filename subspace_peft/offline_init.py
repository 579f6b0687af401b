"""Offline, streaming adapter initialisation: a saved adapter folder straight from a checkpoint on disk, one weight in
memory at a time.

``get_peft_model(base, config)`` needs the whole base model in memory to take its SVDs. :func:`init_adapter` builds
the model's skeleton on the meta device (no weight memory), plans and checks every target exactly as
``get_peft_model`` would (the same tuner, the same matching rules, rank checks and method checks, on the skeleton),
then reads each targeted weight from the safetensors shards on its own, initialises that one layer with the method's
own code (``_initial_factors``: the SVD through ``subspace_peft.linalg``, cached when ``config.svd_cache`` says so,
then ``_factors_from_svd``), keeps the layer's adapter tensors and frees the weight. Peak memory is about one weight,
its SVD and the adapter, whatever the number of layers.

The folder it writes is what ``get_peft_model(base, config)`` followed by ``save_pretrained`` writes
(``adapter_config.json``, ``adapter_model.safetensors``, ``README.md``); ``PeftModel.from_pretrained`` loads it
without any SVD.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from contextlib import nullcontext
from typing import Optional, Union

import torch
from torch import nn

from .registry import method_record
from .tuners.base.config import TargetConfig, expect_checkpoint, mark_checkpoint_loaded
from .tuners.base.layer import FactorLayer
from .tuners.base.model import PlannedTuner, SVDTuner
from .tuners.base.plan import InitCall, LayerPlan
from .tuners.base.targets import Target

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"


def init_adapter(
    base: str,
    config: TargetConfig,
    out_dir: str,
    *,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[Union[str, torch.dtype]] = None,
    overwrite: bool = False,
    revision: Optional[str] = None,
    seed: Optional[int] = None,
    autocast_adapter_dtype: bool = True,
    progress: bool = True,
) -> str:
    """Write the adapter ``get_peft_model(model, config)`` would start from, without loading ``model``.

    Args:
        base: a local folder holding a transformers model (``config.json`` and ``model.safetensors``, or shards
            with ``model.safetensors.index.json``), or a Hub repo id (only its ``*.safetensors`` and ``*.json`` files
            are downloaded).
        config: a PiSSA (QPiSSA included), SVFit, Effort or FLoRA config, as given to ``get_peft_model``.
        out_dir: the adapter folder to write. It must not exist or be empty, unless ``overwrite=True``. The folder
            is written under a temporary name beside it and renamed at the end: a failure leaves nothing behind.
        device: where the SVDs run (default: ``"cuda"`` if available, else ``"cpu"``).
        dtype: the dtype the base model would be loaded in (``from_pretrained(..., dtype=...)``), which sets the
            adapter's dtype; default ``"auto"`` as transformers loads it: the config's ``dtype``, else the stored
            one.
        overwrite: replace a non-empty ``out_dir``.
        revision: the Hub revision of ``base`` (Hub ids only); recorded in the adapter config as ``get_peft_model``
            does with ``revision=``.
        seed: FLoRA only (random init): seeds the global RNG before the first layer, as ``torch.manual_seed(seed)``
            before ``get_peft_model`` would; the caller's RNG state is left as it was. None: the current global RNG.
        autocast_adapter_dtype: as ``get_peft_model``'s: fp16/bf16 trainable adapter tensors are stored in fp32.
        progress: show a progress bar over the layers.

    Returns:
        ``out_dir``.
    """
    from peft import get_peft_model
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.tuners.tuners_utils import cast_adapter_dtype
    from peft.utils.save_and_load import get_peft_model_state_dict
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING.get(getattr(config, "peft_type", None))
    if not isinstance(config, TargetConfig) or tuner_cls is None or not issubclass(tuner_cls, PlannedTuner):
        raise ValueError(
            f"init_adapter initialises subspace-peft adapters (PiSSAConfig, SVFitConfig, EffortConfig, FLoRAConfig), "
            f"got {type(config).__name__}: for peft's own methods use get_peft_model on the loaded model"
        )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise ValueError(
            "init_adapter runs in a single process (it streams one weight at a time): run it outside torchrun / "
            "accelerate launch, then load the folder in the distributed job"
        )
    out_dir = os.path.abspath(os.fspath(out_dir))
    _check_out_dir(out_dir, overwrite)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if not issubclass(tuner_cls, SVDTuner):
        device = torch.device("cpu")  # no SVD to run (FLoRA): its random init draws from the CPU generator
    folder = _resolve_base(base, revision)
    tensor_files = _checkpoint_index(folder)

    # -- plan and check every target on the meta skeleton, as get_peft_model does, before computing anything -------
    config = copy.deepcopy(config)
    mark_checkpoint_loaded(config)  # a config read from a saved adapter initialises like a new one here
    model = _meta_skeleton(folder, name=os.fspath(base))
    load_dtype = _load_dtype(dtype, model.config)
    planning = copy.deepcopy(config)
    record = method_record(config.peft_type)
    chooser = record.ranks_from_weights if record is not None else None
    if chooser and getattr(planning, chooser, None) is not None:
        # ranks the weights choose (SVFit's energy): the skeleton is planned at rank 1 (same layers, same tensor
        # names); each layer's real rank is chosen from its weight below, by the tuner's own _plan_layer
        setattr(planning, chooser, None)
        planning.r = 1
    expect_checkpoint(planning)  # layers built empty, on the meta device: no weight read, nothing initialised
    peft_model = get_peft_model(model, planning, autocast_adapter_dtype=autocast_adapter_dtype)
    tuner = peft_model.base_model
    layers = [(key, module) for key, module in tuner.model.named_modules() if isinstance(module, FactorLayer)]
    expected = get_peft_model_state_dict(peft_model, adapter_name=ADAPTER_NAME)
    adapter_keys = {
        tuner_cls._remove_adapter_name_from_key(f"base_model.model.{key}.{rel}", ADAPTER_NAME)
        for key, layer in layers
        for rel, _, _ in layer.adapter_tensors(ADAPTER_NAME)
    }
    others = sorted(set(expected) - adapter_keys)
    if others:
        raise ValueError(
            f"save_pretrained would also write {len(others)} base-model tensor(s) with this config (e.g. "
            f"'{others[0]}'): bias={getattr(config, 'bias', 'none')!r}, modules_to_save={config.modules_to_save!r} "
            "or an embedding layer in target_modules. init_adapter writes adapter tensors only: use bias='none', no "
            "modules_to_save and no embedding target, or run get_peft_model on the loaded model"
        )
    aliases = _parameter_aliases(model)
    sources = {}  # layer key -> (checkpoint tensor name, file)
    for key, layer in layers:
        base_layer = layer.get_base_layer()
        name, path = _find_tensor(f"{key}.weight", aliases, tensor_files, getattr(model, "base_model_prefix", ""))
        shape = _stored_shape(path, name)
        if shape != tuple(base_layer.weight.shape):
            raise ValueError(
                f"checkpoint tensor '{name}' ({os.path.basename(path)}) has shape {shape}, but layer '{key}' of "
                f"{type(model).__name__} built from config.json needs {tuple(base_layer.weight.shape)}: the "
                "checkpoint does not belong to this config.json"
            )
        sources[key] = (name, path)

    # -- stream: one weight at a time -----------------------------------------------------------------------------
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
    try:
        tensors: dict[str, torch.Tensor] = {}
        plans: dict[str, LayerPlan] = {}
        rng = torch.random.fork_rng(devices=[]) if seed is not None else nullcontext()
        with rng, torch.no_grad():
            if seed is not None:
                torch.manual_seed(seed)
            for key, layer in tqdm(layers, desc=f"{tuner.method_name} init", disable=not progress):
                name, path = sources[key]
                weight = _read_tensor(path, name, load_dtype).to(device)
                standin = copy.deepcopy(layer.get_base_layer())  # the meta base layer's type and settings
                standin.weight = nn.Parameter(weight, requires_grad=False)
                # the tuner's own planning and checks (finite weights, the rank the weight decides), on this layer
                plan = tuner._plan(_one_layer_model(key, standin), _one_layer_config(config, key))[key]
                plan.factors = tuner._initial_factors({key: plan}, config, InitCall())[key]
                built = tuner.tuner_layer_cls(standin, ADAPTER_NAME, plan)
                cast_adapter_dtype(built, ADAPTER_NAME, autocast_adapter_dtype=autocast_adapter_dtype)
                for rel, _, tensor in built.adapter_tensors(ADAPTER_NAME):
                    full = tuner_cls._remove_adapter_name_from_key(f"base_model.model.{key}.{rel}", ADAPTER_NAME)
                    tensors[full] = tensor.detach().to("cpu").contiguous()
                plans[key] = LayerPlan(Target(key, layer.get_base_layer()), plan.r, plan.scale, plan.dropout)
                del weight, standin, plan, built
        if set(tensors) != set(expected):
            raise RuntimeError(  # our key layout and peft's disagree: a bug, not a user error
                f"init_adapter produced tensors {sorted(set(tensors) ^ set(expected))[:4]} that differ from what "
                "save_pretrained writes; please report this"
            )
        config = tuner._recorded_config(config, plans)  # what the weights decided (SVFit's energy ranks)
        save_file(tensors, os.path.join(work, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        del tensors
        _save_config(peft_model, planning, config, base, revision, work)
        _replace_dir(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out_dir


# -- inputs -------------------------------------------------------------------------------------------------------
def _check_out_dir(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir '{out_dir}' is a file: pass a folder path for the adapter")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(
            f"out_dir '{out_dir}' exists and is not empty: choose a new folder, or pass overwrite=True (--overwrite) "
            "to replace it"
        )


def _resolve_base(base: str, revision: Optional[str]) -> str:
    """A local folder, or the Hub snapshot (safetensors and json files only) of a repo id."""
    base = os.fspath(base)
    if os.path.isdir(base):
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repo ids; '{base}' is a local folder")
        return base
    if os.path.exists(base):
        raise ValueError(
            f"base '{base}' is a file: pass the model's folder (config.json and *.safetensors) or a Hub id"
        )
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(base, revision=revision, allow_patterns=["*.safetensors", "*.json"])
    except Exception as error:
        raise ValueError(
            f"base '{base}' is no local folder and could not be downloaded from the Hub ({type(error).__name__}: "
            f"{error}): pass a local model folder or a Hub repo id you can access"
        ) from error


def _checkpoint_index(folder: str) -> dict[str, str]:
    """Checkpoint tensor name -> path of the safetensors file holding it (headers only, no tensor read)."""
    from safetensors import safe_open

    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"'{folder}' has no config.json: init_adapter needs a transformers model folder")
    index = os.path.join(folder, SAFE_INDEX)
    if os.path.isfile(index):
        with open(index) as handle:
            weight_map = json.load(handle).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map: save the model again with save_pretrained")
        files = {name: os.path.normpath(os.path.join(folder, str(file))) for name, file in weight_map.items()}
        root = os.path.normpath(folder)
        outside = sorted({path for path in files.values() if os.path.dirname(path) != root})
        if outside:  # an index is data from the checkpoint's author: it names files in its own folder, nothing else
            raise ValueError(
                f"{SAFE_INDEX} points outside '{folder}' ({outside[0]}): the index must name shard files in the model "
                "folder; re-download the checkpoint or fix its index"
            )
        missing = sorted({path for path in files.values() if not os.path.isfile(path)})
        if missing:
            raise ValueError(
                f"{SAFE_INDEX} lists shard(s) missing from '{folder}': {[os.path.basename(p) for p in missing]}; "
                "download or copy the complete checkpoint"
            )
        return files
    single = os.path.join(folder, SAFE_SINGLE)
    paths = [single] if os.path.isfile(single) else []
    if not paths:
        paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not paths:
        pickled = sorted(f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
        found = f" (it holds {pickled}, a pickled checkpoint, which this package never loads)" if pickled else ""
        raise ValueError(
            f"'{folder}' has no *.safetensors checkpoint{found}: convert it to safetensors first, e.g. "
            "AutoModel.from_pretrained(folder).save_pretrained(new_folder) on a machine that may unpickle it, or "
            "the Hub's safetensors conversion"
        )
    files = {}
    for path in paths:
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                files.setdefault(name, path)
    return files


def _meta_skeleton(folder: str, name: str) -> nn.Module:
    """The model built from ``config.json`` on the meta device: the class ``config.architectures`` names (what
    ``from_pretrained`` would build), else ``AutoModel``'s. Its config is named ``name`` (as ``from_pretrained(name)``
    names it, for the model card); the model itself ``folder`` (where peft reads the base config when saving)."""
    import transformers
    from transformers import AutoConfig, AutoModel

    model_config = AutoConfig.from_pretrained(folder)
    classes = [getattr(transformers, name, None) for name in (getattr(model_config, "architectures", None) or [])]
    model_cls = next((cls for cls in classes if cls is not None), None)
    with torch.device("meta"):
        if model_cls is not None:
            model = model_cls._from_config(model_config)
        else:
            model = AutoModel.from_config(model_config)
    model.config._name_or_path = name
    model.name_or_path = folder
    return model.eval()


def _load_dtype(dtype, model_config) -> Optional[torch.dtype]:
    """The dtype ``from_pretrained(dtype=...)`` would give every weight; None: each tensor's stored dtype."""
    if dtype is None or dtype == "auto":
        dtype = getattr(model_config, "dtype", None)
        if dtype is None:
            return None
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
            raise ValueError(f"dtype {dtype!r} is not a torch floating-point dtype: pass e.g. 'bfloat16' or 'float32'")
        return resolved
    return dtype


# -- checkpoint tensors -------------------------------------------------------------------------------------------
def _parameter_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Every parameter name -> all names of the same tensor (tied weights: lm_head.weight is embed_tokens.weight)."""
    groups: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    return {name: names for names in groups.values() for name in names}


def _find_tensor(param: str, aliases: dict, files: dict[str, str], base_prefix: str) -> tuple[str, str]:
    """(checkpoint tensor name, file) of the model parameter ``param``: its own name, a tied alias's, each with the
    base-model prefix (``model.``, ``transformer.``) dropped or added, as checkpoints saved from a bare base model or
    a model with a head name them."""
    tried = []
    for name in aliases.get(param, [param]):
        candidates = [name]
        if base_prefix:
            if name.startswith(base_prefix + "."):
                candidates.append(name[len(base_prefix) + 1 :])
            else:
                candidates.append(f"{base_prefix}.{name}")
        for candidate in candidates:
            if candidate in files:
                return candidate, files[candidate]
            tried.append(candidate)
    raise ValueError(
        f"the checkpoint holds no tensor for '{param}' (tried {tried}): the safetensors files do not match "
        "config.json's model (another model's shards, a truncated download, or renamed tensors); download or save "
        "the complete checkpoint again"
    )


def _stored_shape(path: str, name: str) -> tuple[int, ...]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            return tuple(handle.get_slice(name).get_shape())
    except Exception as error:
        raise ValueError(
            f"{os.path.basename(path)} does not hold tensor '{name}', which {SAFE_INDEX} places there "
            f"({type(error).__name__}: {error}): the shard is incomplete or from another checkpoint; download or save "
            "the checkpoint again"
        ) from error


def _read_tensor(path: str, name: str, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """One tensor, copied out of its file; the file is mapped only while it is read (its pages do not stay
    resident)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            tensor = handle.get_tensor(name)
    except Exception as error:
        raise ValueError(
            f"could not read tensor '{name}' from {path} ({type(error).__name__}: {error}): the file is incomplete "
            "or corrupt; download or save the checkpoint again"
        ) from error
    if not tensor.dtype.is_floating_point:
        return tensor  # check_target names the quantised layer
    return tensor if dtype is None else tensor.to(dtype)


def _one_layer_model(key: str, module: nn.Module) -> nn.Module:
    """A module holding only ``module``, under its name ``key`` in the full model."""
    root = parent = nn.Module()
    *path, leaf = key.split(".")
    for part in path:
        child = nn.Module()
        parent.add_module(part, child)
        parent = child
    parent.add_module(leaf, module)
    return root


def _one_layer_config(config, key: str):
    """``config`` targeting exactly ``key`` (already chosen by the full model's matching rules)."""
    one = copy.copy(config)
    one.target_modules, one.exclude_modules = {key}, None
    one.layers_to_transform = one.layers_pattern = None
    return one


# -- output -------------------------------------------------------------------------------------------------------
def _save_config(peft_model, planning, config, base: str, revision: Optional[str], folder: str) -> None:
    """adapter_config.json as ``save_pretrained`` writes it, and its README.md: the targets as peft resolved them
    (``all-linear`` expanded), the base model named as the user named it."""
    saved = copy.deepcopy(config)
    saved.target_modules = copy.deepcopy(planning.target_modules)
    saved.base_model_name_or_path = os.fspath(base)
    saved.revision = revision
    saved.inference_mode = True
    auto_mapping = None
    if saved.task_type is None:
        base_cls = peft_model._get_base_model_class(is_prompt_tuning=False)
        auto_mapping = {"base_model_class": base_cls.__name__, "parent_library": base_cls.__module__}
    saved.save_pretrained(folder, auto_mapping_dict=auto_mapping)
    peft_model.peft_config[ADAPTER_NAME] = saved
    peft_model.create_or_update_model_card(folder)


def _replace_dir(work: str, out_dir: str) -> None:
    """Move the finished ``work`` folder to ``out_dir`` (replacing an existing one only once ``work`` is whole)."""
    if not os.path.exists(out_dir):
        os.rename(work, out_dir)
        return
    if not os.listdir(out_dir):
        os.rmdir(out_dir)
        os.rename(work, out_dir)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(out_dir))
    os.rmdir(old)
    os.rename(out_dir, old)
    os.rename(work, out_dir)
    shutil.rmtree(old, ignore_errors=True)
