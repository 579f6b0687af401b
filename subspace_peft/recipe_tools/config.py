"""What the recipes share: the YAML loader (:class:`RecipeLoader`, the file read once), the recipe dataclass built
from the file and the flags (:func:`build_recipe`; the flags are :mod:`.arguments`'), the checks, and the one-line
errors every bad input gets, located in one place (:func:`locate`).

Every problem with a recipe's input is a :class:`RecipeError` (a ValueError): one line naming the file (and line)
or flag it came from, the key and the fix. A recipe's ``main`` prints it as ``error: <message>`` and exits with
status 2, as argparse does; called from Python the recipes raise it.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import typing
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Optional, TypeVar

import yaml

from .. import checks

T = TypeVar("T")

_SOURCE_ATTRIBUTE = "_recipe_source"


class RecipeError(ValueError):
    """A bad recipe input, as one line that names where it came from, the key and the fix.

    ``key`` (``"eval_size"``, ``"training.learning_rate"``) is set while the message does not yet say where the
    value came from; :func:`located` then prefixes the file and line, or the command-line flag.
    """

    def __init__(self, message: str, key: Optional[str] = None):
        super().__init__(one_line(message))
        self.key = key


def one_line(text: Any) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


@dataclass
class RecipeSource:
    """Where a recipe's values came from: the YAML file with each key's line, and the keys given as flags
    (``flag_names``: keys, nested ones included (``"training.max_steps"``), mapped to the flag that set them
    (``"max_steps"``), for a flag that changed one key of a mapping the file also sets)."""

    path: Optional[str] = None
    lines: dict = field(default_factory=dict)  # "key" and "key.subkey" -> 1-based line in ``path``
    flag_names: dict = field(default_factory=dict)  # "key" or "key.subkey" -> the flag (without --) that set it

    def where(self, key: str) -> Optional[str]:
        candidate = key
        while candidate:  # "training.max_steps", then "training"
            if candidate in self.flag_names:
                return f"--{self.flag_names[candidate]}"
            candidate = _parent_key(candidate)
        candidate = key
        while candidate:  # "tasks[1].model", then "tasks[1]", then "tasks"
            if candidate in self.lines:
                return f"{self.path}:{self.lines[candidate]}"
            candidate = _parent_key(candidate)
        return None


def _parent_key(key: str) -> str:
    return key[: max(key.rfind("."), key.rfind("["), 0)]


def source_of(recipe) -> RecipeSource:
    return getattr(recipe, _SOURCE_ATTRIBUTE, None) or RecipeSource()


def locate(error: RecipeError, source: RecipeSource) -> RecipeError:
    """``error`` with its message prefixed by where its key's value came from (once)."""
    if error.key is None:
        return error
    where, message = source.where(error.key), str(error)
    top = re.split(r"[.\[]", error.key, maxsplit=1)[0]
    if where == f"--{top}" and message.startswith(f"{top}: "):  # "--resume: ...", not "--resume: resume: ..."
        message = message[len(top) + 2 :]
    located_error = RecipeError(f"{where}: {message}" if where else message)
    located_error.__cause__ = error.__cause__
    return located_error


@contextmanager
def located(recipe):
    """Re-raise a :class:`RecipeError` raised inside with the file and line (or flag) of its key."""
    try:
        yield
    except RecipeError as error:
        raise locate(error, source_of(recipe)) from None


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading a number with an exponent as a float with or without a dot (``1e-4``, ``1E5``,
    ``.5e-3``, ``1.0e5``), as YAML 1.2 does: YAML 1.1's resolver, PyYAML's, reads ``1e-4`` as a string. Every YAML
    the recipes read (the file, each flag's value) goes through it."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _key_lines(root, path: str) -> dict:
    """Each top-level key's line, each key of a mapping value (``training.learning_rate``), each item of a list
    value and its keys (``tasks[1]``, ``tasks[1].model``); 1-based, from the file's node tree. A top-level key given
    twice (YAML would keep the last silently) is a :class:`RecipeError`."""
    lines = {}
    for key_node, value_node in root.value if isinstance(root, yaml.MappingNode) else ():
        key = str(key_node.value)
        if key in lines:
            raise RecipeError(
                f"{path}:{key_node.start_mark.line + 1}: {key} is set twice (first on line "
                f"{lines[key]}); fix: keep one of them"
            )
        lines[key] = key_node.start_mark.line + 1
        if isinstance(value_node, yaml.MappingNode):
            for sub_key, _ in value_node.value:
                lines[f"{key}.{sub_key.value}"] = sub_key.start_mark.line + 1
        elif isinstance(value_node, yaml.SequenceNode):
            for index, item in enumerate(value_node.value):
                lines[f"{key}[{index}]"] = item.start_mark.line + 1
                if isinstance(item, yaml.MappingNode):
                    for sub_key, _ in item.value:
                        lines[f"{key}[{index}].{sub_key.value}"] = sub_key.start_mark.line + 1
    return lines


def yaml_error_message(path: str, error) -> str:
    """``path:line:column: <problem>`` from a yaml error (one line)."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
    problem = " ".join(part for part in (getattr(error, "problem", None), getattr(error, "context", None)) if part)
    return f"{where}: malformed YAML: {problem or error}; fix the YAML syntax at that line"


def read_yaml_recipe(path: str) -> tuple[dict, dict]:
    """(values, key lines) of the YAML recipe at ``path``, parsed once (:class:`RecipeLoader`); every problem is a
    one-line :class:`RecipeError`."""
    if os.path.isdir(path):
        raise RecipeError(
            f"--config {path}: is a folder; fix: pass the YAML recipe file itself (e.g. recipes/configs/pissa.yaml)"
        )
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise RecipeError(
            f"--config {path}: no such file; fix: pass an existing YAML recipe (e.g. recipes/configs/pissa.yaml)"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"--config {path}: cannot be read ({error}); fix: pass a readable UTF-8 YAML file") from None
    loader = RecipeLoader(text)
    try:
        root = loader.get_single_node()
        values = loader.construct_document(root) if root is not None else {}
    except yaml.YAMLError as error:
        raise RecipeError(yaml_error_message(path, error)) from None
    finally:
        loader.dispose()
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise RecipeError(
            f"{path}:1: the recipe must be a YAML mapping of key: value lines, got a "
            f"{type(values).__name__}; fix: write one 'key: value' per line"
        )
    bad = [k for k in values if not isinstance(k, str)]
    if bad:
        raise RecipeError(f"{path}: keys must be names, got {bad!r}; fix: write them as words (e.g. max_length: 64)")
    return values, _key_lines(root, path)


def build_recipe(cls: type[T], values: dict, source: RecipeSource) -> T:
    """``cls(**values)``, its keys and values checked: an unknown or missing key, a wrong type or range is a
    one-line :class:`RecipeError` naming the file and line, or the flag, of the key at fault."""
    path = source.path
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:  # only the file's: an unknown flag is argparse's error
        hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
        hint = "; ".join(f"did you mean {m[0]!r} for {k!r}?" for k, m in hints.items() if m)
        message = f"unknown recipe keys {unknown}; {hint + ' ' if hint else ''}fix: remove or rename them"
        raise locate(RecipeError(f"{message} (known keys: {sorted(known)})", key=unknown[0]), source)
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [k for k in required if k not in values]
    if missing:
        raise RecipeError(
            f"{path or 'command line'}: missing required recipe key(s) {missing}; fix: add "
            + ", ".join(f"'{k}: ...'" for k in missing)
            + (" to the file" if path else " as --key value, or pass --config FILE.yaml")
        )
    try:
        recipe = cls(**values)
    except RecipeError as error:
        raise locate(error, source) from None
    object.__setattr__(recipe, _SOURCE_ATTRIBUTE, source)
    return recipe


# -- checks shared by the recipes' __post_init__ -------------------------------------------------------------------

_KINDS = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    dict: "a mapping",
    list: "a list",
}


def _describe(value) -> str:
    return f"{value!r} ({type(value).__name__})" if not isinstance(value, (dict, list)) else type(value).__name__


def check_field_types(recipe) -> None:
    """Every field of the dataclass ``recipe`` has its annotated type (``Optional[X]``: X or null); an int becomes a
    float where the field is a float. Raises :class:`RecipeError` keyed by field."""
    hints = typing.get_type_hints(type(recipe))
    for f in fields(recipe):
        hint, value = hints[f.name], getattr(recipe, f.name)
        optional = False
        if typing.get_origin(hint) is typing.Union:
            arguments = [a for a in typing.get_args(hint) if a is not type(None)]
            optional = len(arguments) < len(typing.get_args(hint))
            hint = arguments[0] if len(arguments) == 1 else None
        if hint is None or hint is Any or (optional and value is None):
            continue
        hint = typing.get_origin(hint) or hint
        if hint is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                object.__setattr__(recipe, f.name, float(value))
                continue
        elif hint is int:
            if isinstance(value, int) and not isinstance(value, bool):
                continue
        elif isinstance(value, hint):
            continue
        kind = _KINDS.get(hint, hint.__name__) + (" or null" if optional else "")
        example = {int: " (e.g. 64)", float: " (e.g. 0.5)", dict: " ({key: value})", list: " ([a, b])"}
        raise RecipeError(
            f"{f.name} must be {kind}, got {_describe(value)}; fix: set {f.name} to {kind}{example.get(hint, '')}",
            key=f.name,
        )


def recipe_field(default, help_text: str):
    """A recipe dataclass field: its default (a mapping is copied for each recipe) and its ``--help`` text."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"help": help_text})
    return field(default=default, metadata={"help": help_text})


@contextmanager
def owner_error(key: str, where: str = "recipe"):
    """A ValueError its owner (a :mod:`subspace_peft.checks` check, a merge parameter's schema) raises inside, worded
    ``"{where}: ..."``, as a :class:`RecipeError` keyed by ``key`` (located later: file and line, or flag)."""
    try:
        yield
    except RecipeError:
        raise
    except ValueError as error:
        raise RecipeError(str(error).removeprefix(f"{where}: "), key=key) from None


def check_positive_int(key: str, value, what: str) -> None:
    """``value`` is an integer >= 1, else a :class:`RecipeError` naming ``key``; ``what`` says what it counts."""
    with owner_error(key):
        checks.integer("recipe", key, value, f"fix: set {key} to a positive integer ({what})", low=1)


def check_choice(key: str, value, options: tuple) -> None:
    """``value`` is one of ``options``, else a :class:`RecipeError` naming ``key`` and the options."""
    with owner_error(key):
        checks.choice("recipe", key, value, options, f"fix: set {key} to one of them")


def check_number(key: str, value, low: Optional[float] = None, high: Optional[float] = None, **bounds) -> float:
    """``value`` as a finite float in the interval (``low_open``/``high_open``: the bound itself is outside), else
    a :class:`RecipeError` naming ``key`` and the interval."""
    with owner_error(key):
        return checks.number("recipe", key, value, f"fix: set {key} to a number in that range", low, high, **bounds)


def check_finite_numbers(key: str, value) -> None:
    """No NaN or infinite float anywhere in ``value`` (nested mappings and lists included)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"{key} is {value}, which is not a finite number; fix: set {key} to a finite value", key=key)
    if isinstance(value, dict):
        for sub_key, sub_value in value.items():
            check_finite_numbers(f"{key}.{sub_key}", sub_value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_finite_numbers(key, item)


def check_repo_id(key: str, value: Optional[str]) -> None:
    """``value`` is None or a valid Hugging Face Hub repo id (``user/name``), checked without any network call."""
    if value is None:
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as error:
        raise RecipeError(
            f"{key} {value!r} is not a valid Hub repo id ({error}); fix: set {key} to 'user/name' "
            "(letters, digits, '-', '_', '.')",
            key=key,
        ) from None


def check_pretrained_source(key: str, path: str, marker: str, fix: str) -> None:
    """``path`` (the value of ``key``) is a local folder whose ``marker`` file (config.json, adapter_config.json)
    parses as JSON, or, if no such path exists, a valid Hub repo id; else a :class:`RecipeError`. Reads no
    weights and makes no network call."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.isdir(path):
        marker_path = os.path.join(path, marker)
        if not os.path.isfile(marker_path):
            raise RecipeError(f"{key}: the folder {path} has no {marker}; {fix}", key=key)
        try:
            with open(marker_path, encoding="utf-8") as handle:
                json.load(handle)
        except json.JSONDecodeError as error:
            raise RecipeError(
                f"{marker_path}:{error.lineno}:{error.colno}: not valid JSON ({error.msg}) ({key}); "
                "fix: restore the file (save the model again)"
            ) from None
        except (OSError, ValueError) as error:
            raise RecipeError(f"{key}: {marker_path} cannot be read ({one_line(error)}); {fix}", key=key) from None
        return
    if os.path.exists(path):
        raise RecipeError(f"{key}: {path} is a file, not a folder; {fix}", key=key)
    try:
        validate_repo_id(path)
    except HFValidationError:
        raise RecipeError(f"{key}: no folder {path!r}, and it is no Hub repo id either; {fix}", key=key) from None


def check_output_dir(key: str, path: str) -> None:
    """``path`` is a folder or does not exist yet (it is created later): not a file."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise RecipeError(f"{key}: {path} is a file; fix: set {key} to a folder (it is created if missing)", key=key)


# -- data files ----------------------------------------------------------------------------------------------------


def read_json_rows(path: str, what: str, key: Optional[str] = None) -> list[tuple[str, Any]]:
    """(where, record) pairs of a JSON-lines file (where: ``path:line``) or of a JSON file holding a list of records
    (where: ``path record N``). ``what`` names the key the file comes from (``key``: the recipe key, to locate a
    missing file's entry). A missing or unreadable file and malformed JSON are a :class:`RecipeError` naming the
    file and line."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise RecipeError(f"{what}: no such file {path}; fix: set {what} to an existing file", key=key) from None
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(
            f"{what}: {path} cannot be read ({one_line(error)}); fix: pass a readable UTF-8 file", key=key
        ) from None
    if text.lstrip().startswith("["):  # one JSON array of records
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise RecipeError(
                f"{path}:{error.lineno}:{error.colno}: not valid JSON ({error.msg}); fix the JSON there ({what})"
            ) from None
        return [(f"{path} record {index + 1}", record) for index, record in enumerate(records)]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as error:
            try:  # one JSON object over several lines: not a list of records
                json.loads(text)
            except json.JSONDecodeError:
                raise RecipeError(
                    f"{path}:{number}:{error.colno}: not valid JSON ({error.msg}); fix: one JSON "
                    f"object per line ({what})"
                ) from None
            raise RecipeError(
                f"{path}: holds a single JSON document, not records; fix: write one JSON object per "
                f"line, or a JSON list of objects ({what})"
            ) from None
    return rows
