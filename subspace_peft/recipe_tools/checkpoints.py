"""Which ``checkpoint-N`` folder a resumed run continues from: the newest one Trainer could resume from exactly,
checked without unpickling anything; a newer, incomplete one (a run killed while saving) is skipped with one line
saying why."""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Optional

from .config import RecipeError, one_line

_WEIGHT_FILES = (
    "adapter_model.safetensors",
    "adapter_model.bin",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _file_problem(path: str) -> Optional[str]:
    """Why the checkpoint file at ``path`` cannot be loaded, or None; read without unpickling anything: JSON parses,
    a safetensors header parses and covers the file, a torch file is a zip archive whose members pass their CRC."""
    import zipfile

    if os.path.getsize(path) == 0:
        return "is empty"
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as handle:
                json.load(handle)
        except json.JSONDecodeError as error:
            return f"is not valid JSON (line {error.lineno}: {error.msg}): truncated?"
        except (OSError, ValueError) as error:
            return f"cannot be read ({one_line(error)})"
    elif path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="numpy") as handle:
                list(handle.keys())
        except Exception as error:  # noqa: BLE001  (SafetensorError derives from Exception only)
            return f"is truncated or corrupt ({one_line(error)})"
    elif path.endswith((".pt", ".pth", ".bin")):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
            return f"is truncated or corrupt (not a readable torch zip archive: {one_line(error)})"
        if bad is not None:
            return f"is corrupt (its member {bad} fails its CRC check)"
    return None


def checkpoint_problem(path: str, save_only_model: bool = False) -> Optional[str]:
    """Why Trainer could not resume exactly from the ``checkpoint-N`` folder ``path``, or None if it can.

    Complete means: ``trainer_state.json`` (which Trainer writes last) is there, every file in the folder is
    loadable (:func:`_file_problem`), and the model weights, the optimizer and scheduler states and an RNG state are
    all there (Trainer would otherwise resume with a fresh optimizer without a word). DeepSpeed keeps model and
    optimizer in its ``global_step*`` folder; ``save_only_model`` checkpoints hold only the weights."""
    names = set(os.listdir(path))
    if "trainer_state.json" not in names:
        return "trainer_state.json is missing: the save did not finish"
    for root, subfolders, files in os.walk(path):
        subfolders.sort()
        for name in sorted(files):
            problem = _file_problem(os.path.join(root, name))
            if problem:
                return f"{os.path.relpath(os.path.join(root, name), path)} {problem}"
    folders = {n for n in names if os.path.isdir(os.path.join(path, n))}
    deepspeed = any(n.startswith("global_step") for n in folders)
    if not (deepspeed or names.intersection(_WEIGHT_FILES) or any(n.startswith("pytorch_model_fsdp") for n in names)):
        return "adapter_model.safetensors is missing (no model weights)"
    if save_only_model:
        return None
    if not deepspeed:
        if not ({"optimizer.pt", "optimizer.bin"} & names or any(n.startswith("optimizer") for n in folders)):
            return "optimizer.pt is missing"
        if "scheduler.pt" not in names:
            return "scheduler.pt is missing"
    if not any(re.fullmatch(r"rng_state(_\d+)?\.pth", n) for n in names):
        return "rng_state.pth is missing"
    return None


def last_complete_checkpoint(output_dir: str, save_only_model: bool = False) -> str:
    """The newest ``checkpoint-N`` in ``output_dir`` that :func:`checkpoint_problem` finds complete. A run killed
    while saving (or a file truncated since) leaves a newer, incomplete folder: it is skipped with one line on stderr
    saying why and which checkpoint is used instead. No complete checkpoint is a :class:`RecipeError`."""
    fix = "fix: set resume: false to start a new run, or output_dir to the run to continue"
    if not os.path.isdir(output_dir):
        raise RecipeError(
            f"resume: {output_dir} does not exist, so there is no checkpoint to resume from; {fix}", key="resume"
        )
    steps = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            steps.append((int(match.group(1)), os.path.join(output_dir, name)))
    if not steps:
        raise RecipeError(f"resume: {output_dir} holds no checkpoint-N folder to resume from; {fix}", key="resume")
    skipped = []
    for _, path in sorted(steps, reverse=True):
        problem = checkpoint_problem(path, save_only_model)
        if problem is None:
            if skipped and int(os.environ.get("RANK", "0")) == 0:
                print(
                    f"resume: skipping incomplete checkpoint {'; '.join(skipped)}; resuming from {path}",
                    file=sys.stderr,
                )
            return path
        skipped.append(f"{path} ({problem})")
    raise RecipeError(f"resume: no complete checkpoint in {output_dir}: {'; '.join(skipped)}; {fix}", key="resume")
