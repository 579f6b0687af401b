"""Every field our config classes declare carries ``metadata={"help": ...}`` (as peft's own configs do), specific to
its method (issue 14 item 4)."""

from __future__ import annotations

import dataclasses

import pytest
from peft.config import PeftConfig

from subspace_peft import EffortConfig, FLoRAConfig, PiSSAConfig, SVFitConfig

CONFIG_CLASSES = [PiSSAConfig, SVFitConfig, FLoRAConfig, EffortConfig]
PEFT_FIELDS = {f.name for f in dataclasses.fields(PeftConfig)}
MIN_HELP = 20


def own_fields(config_class) -> list[dataclasses.Field]:
    """The fields our classes declare (TargetConfig, SVDInitConfig and the method's config), not peft's."""
    return [f for f in dataclasses.fields(config_class) if f.name not in PEFT_FIELDS]


def squeeze(text: str) -> str:
    """``text`` without whitespace: argparse re-wraps help (and may break a line after a hyphen)."""
    return "".join(text.split())


@pytest.mark.parametrize("config_class", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_every_own_field_has_help(config_class):
    fields = own_fields(config_class)
    assert len(fields) > 5  # the targets, and the method's own fields
    missing = [f.name for f in fields if len(str(f.metadata.get("help") or "").strip()) < MIN_HELP]
    assert not missing, f"{config_class.__name__}: fields without a help of at least {MIN_HELP} characters: {missing}"


def test_help_is_per_class_where_fields_differ():
    """Fields of the same name in two methods (r, bias, rank_pattern) describe that method's meaning."""
    for name in ("r", "bias", "rank_pattern"):
        helps = {
            c.__name__: c.__dataclass_fields__[name].metadata["help"]
            for c in CONFIG_CLASSES
            if name in c.__dataclass_fields__
        }
        assert len(set(helps.values())) == len(helps), (name, helps)
