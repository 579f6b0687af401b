"""The recipes' one command line (recipes/finetune.py's and recipes/merge.py's), built on transformers'
``HfArgumentParser``: one flag per field of the recipe's dataclass (its ``metadata["help"]`` is the flag's help) and,
for finetune.py, per field of ``transformers.TrainingArguments``, over a YAML file (``--config``) in the
recipes/configs/*.yaml format, read once by :class:`.config.RecipeLoader`.

A flag changes its key only (a deep merge): ``--max_steps 300`` sets ``training.max_steps`` and keeps the file's
other ``training:`` keys; a mapping-valued flag (``--method_config '{r: 4}'``, ``--training '{max_steps: 50}'``)
merges key by key into the file's mapping. Later flags win. Values are read as YAML (numbers, ``true``/``false``,
``null``, lists ``[a, b]``, mappings ``{key: value}``), text fields as given. An unknown flag, a malformed value or
a flag without its value is a one-line :class:`.config.RecipeError` naming the flag (and the closest valid one);
the recipe's own checks are located by :func:`.config.build_recipe` (``file:line`` or ``--flag``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
import typing
from enum import Enum
from typing import Optional

import yaml

from .config import RecipeError, RecipeLoader, RecipeSource, build_recipe, locate, read_yaml_recipe


def _yaml_value(raw: str):
    try:
        return yaml.load(raw, Loader=RecipeLoader)
    except yaml.YAMLError as error:
        raise argparse.ArgumentTypeError(
            f"{raw!r} is not a valid YAML value ({getattr(error, 'problem', None) or error}); fix: quote or correct "
            "it (lists as [a, b], mappings as {key: value})"
        ) from None


def _text_value(raw: str):
    """Text flags keep their text (``--run_name 2024`` is the name "2024"), unquoted if quoted (``'"a b"'``);
    ``null`` is None."""
    try:
        value = _yaml_value(raw)
    except argparse.ArgumentTypeError:
        return raw
    return value if value is None or isinstance(value, str) else raw


def _is_text(kind) -> bool:
    return (
        kind is str or typing.get_origin(kind) is typing.Literal or (isinstance(kind, type) and issubclass(kind, Enum))
    )


class RecipeArgumentParser:
    """``HfArgumentParser`` over the recipe dataclass (and, for finetune.py, a TrainingArguments class), with every
    flag's default suppressed (so that only the flags given are known, and override the file) and every value read
    as YAML."""

    def __init__(
        self, recipe_class, training_class=None, description: str = "", training_defaults: Optional[dict] = None
    ):
        from transformers import HfArgumentParser

        class Parser(HfArgumentParser):
            def error(self, message):  # argparse's errors, as the recipe's one line
                match = re.match(r"argument (--[\w-]+)(?:/--[\w-]+)*: (.*)", message)
                if match and match.group(2) == "expected one argument":
                    raise RecipeError(f"command line: {match.group(1)} has no value; fix: pass {match.group(1)} VALUE")
                if match:  # a value's problem (argparse's, or _yaml_value's with its own fix)
                    fix = "" if "; fix: " in match.group(2) else "; fix: see --help"
                    raise RecipeError(f"{match.group(1)}: {match.group(2)}{fix}")
                raise RecipeError(f"command line: {message}; fix: see --help")

        self.recipe_class, self.training_class = recipe_class, training_class
        self.recipe_fields = {f.name: f for f in dataclasses.fields(recipe_class)}
        self.training_fields = (
            {f.name: f for f in dataclasses.fields(training_class) if f.init} if training_class else {}
        )
        groups = [type("RecipeFlags", (recipe_class,), {"_argument_group_name": f"recipe ({recipe_class.__name__})"})]
        if training_class is not None:
            title = f"training (transformers.{training_class.__name__}; the YAML file's training: block)"
            groups.insert(0, type("TrainingFlags", (training_class,), {"_argument_group_name": title}))
        # a recipe field of the same name as a TrainingArguments one (output_dir, seed, push_to_hub) is the recipe's
        self.parser = Parser(
            groups,
            description=description,
            allow_abbrev=False,
            usage="%(prog)s [--config FILE.yaml] [--FLAG VALUE ...]   (--help lists every flag)",
            conflict_handler="resolve",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        groups = self.parser._action_groups  # --help: the recipe's flags first
        groups.sort(key=lambda group: group.title.startswith("training"))
        self.parser.add_argument(
            "--config",
            type=str,
            default=argparse.SUPPRESS,
            help="a YAML recipe (recipes/configs/*.yaml); flags override it key by key",
        )
        hints = {**(typing.get_type_hints(training_class) if training_class else {})}
        hints.update(typing.get_type_hints(recipe_class))
        training_defaults = training_defaults or {}
        for action in self.parser._actions:
            if action.dest in ("help", "config"):
                continue
            recipe_field = self.recipe_fields.get(action.dest)
            field = recipe_field or self.training_fields[action.dest]
            action.default, action.required = argparse.SUPPRESS, False  # a required key may come from the file
            if action.option_strings[0].startswith("--no_"):  # HfArgumentParser's --no_<flag> for a True default
                continue
            kind = field.type if not isinstance(field.type, str) else hints[action.dest]
            action.type = _text_value if _is_text(kind) else _yaml_value
            default = field.default
            if field.default_factory is not dataclasses.MISSING:
                default = field.default_factory()
            if recipe_field is None and action.dest in training_defaults:
                action.help = f"{action.help or ''} (recipe default: {training_defaults[action.dest]})"
            elif default is not dataclasses.MISSING:
                action.help = f"{action.help or ''} (default: {default})"
            action.help = (action.help or "").strip().replace("%", "%%")
            action.choices = None  # the recipe's and TrainingArguments' checks name the key and the fix

    def main(self, run, argv: Optional[list[str]] = None) -> None:
        """``run(self.parse(argv))``, a bad input ``error: <one line>`` on stderr and exit status 2 (as argparse's)."""
        try:
            run(self.parse(argv))
        except RecipeError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    def flag_names(self) -> list[str]:
        return sorted({s for a in self.parser._actions for s in a.option_strings if s.startswith("--")})

    def parse(self, argv: Optional[list[str]]):
        """The recipe: the YAML file (``--config``), then the flags, key by key."""
        namespace, rest = self.parser.parse_known_args(argv)
        if rest:
            self._refuse(rest)
        given = vars(namespace)
        path = given.pop("config", None)
        values, lines = read_yaml_recipe(path) if path is not None else ({}, {})
        source = RecipeSource(path=path, lines=lines)
        self._lift_training_keys(values, source)
        for dest, value in given.items():
            if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
                value = value[0]  # a list flag given as one YAML list (--tasks '[{...}, {...}]')
            if dest in self.recipe_fields:
                self._set(values, source, dest, value, dest)
            elif _training_block(values) is not None:
                self._set(values["training"], source, dest, value, dest, prefix="training.")
        return build_recipe(self.recipe_class, values, source)

    @staticmethod
    def _set(values: dict, source: RecipeSource, key: str, value, flag: str, prefix: str = "") -> None:
        """``values[key] = value``, a mapping merged key by key into the mapping already there."""
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = _deep_merge(values[key], value)
            for sub_key in value:
                source.flag_names[f"{prefix}{key}.{sub_key}"] = flag
        else:
            values[key] = value
            source.flag_names[f"{prefix}{key}"] = flag

    def _lift_training_keys(self, values: dict, source: RecipeSource) -> None:
        """A TrainingArguments key at the top of the file (``max_steps: 300``) is one of the training: block."""
        for key in [k for k in values if k in self.training_fields and k not in self.recipe_fields]:
            training = _training_block(values)
            if training is None:
                return  # the type check names training's line
            if key in training:
                also = f"also in training:, line {source.lines.get(f'training.{key}')}"
                raise locate(RecipeError(f"{key} is set twice ({also}); fix: keep one of them", key=key), source)
            training[key] = values.pop(key)
            if key in source.lines:
                source.lines[f"training.{key}"] = source.lines[key]

    def _refuse(self, rest: list[str]) -> None:
        flags = [token.split("=", 1)[0] for token in rest if token.startswith("-")]
        if not flags:
            raise RecipeError(
                f"command line: expected --key value pairs, got {rest[0]!r}; fix: write each override "
                "as --key value, quoting a value with spaces (e.g. --method_config '{r: 4}')"
            )
        names = [flag.lstrip("-") for flag in flags]
        close = difflib.get_close_matches("--" + names[0].replace("-", "_"), self.flag_names(), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        raise RecipeError(
            f"{flags[0]}: unknown recipe keys {names} (no recipe field"
            f"{f' or {self.training_class.__name__} field' if self.training_class else ''} has that name); {hint}fix: "
            "rename or remove it "
            "(--help lists the flags)"
        )


def _training_block(values: dict) -> Optional[dict]:
    """The recipe's ``training:`` mapping, made if missing; None if the file sets it to no mapping (the type check
    names its line)."""
    if values.get("training") is None:
        values["training"] = {}
    return values["training"] if isinstance(values["training"], dict) else None


def _deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = (
            _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged
