"""What the recipes share: a YAML file read into a dataclass, with ``--key value`` flags overriding it."""

from __future__ import annotations

from dataclasses import fields
from typing import TypeVar

T = TypeVar("T")


def load_recipe(cls: type[T], path: str | None, overrides: list[str]) -> T:
    """``cls(**yaml_values)`` with ``--key value`` overrides (values parsed as YAML: numbers, lists, dicts); an
    unknown key is a ValueError that lists the known ones."""
    import yaml

    values = {}
    if path is not None:
        with open(path) as handle:
            values = yaml.safe_load(handle) or {}
    if len(overrides) % 2:
        raise ValueError(f"expected --key value pairs, got {overrides!r}")
    for flag, value in zip(overrides[::2], overrides[1::2]):
        if not flag.startswith("--"):
            raise ValueError(f"expected --key value pairs, got {flag!r}")
        values[flag[2:].replace("-", "_")] = yaml.safe_load(value)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown recipe keys {unknown}; known keys: {sorted(known)}")
    return cls(**values)
