"""Every field our config classes declare carries ``metadata={"help": ...}`` (as peft's own configs do), and that help
is what ``transformers.HfArgumentParser`` shows for the field's flag (issue 14 item 4)."""

from __future__ import annotations

import copy
import dataclasses
import typing

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


def help_parser(config_class):
    """``HfArgumentParser`` over ``config_class``. HfArgumentParser takes one type per flag, so a union it refuses
    (``layers_to_transform: Optional[Union[list[int], int]]``, as in peft's LoraConfig) becomes a text flag, which is
    how the recipes read values (as YAML). It sets ``field.type`` on the fields it is given; the class's own fields
    are restored afterwards."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        @staticmethod
        def _parse_dataclass_field(parser, field):
            field = copy.copy(field)  # the class's own Field stays as it is
            args = typing.get_args(field.type)
            if typing.get_origin(field.type) is typing.Union and str not in args and (
                    len(args) != 2 or type(None) not in args):
                field.type = typing.Optional[str]
            HfArgumentParser._parse_dataclass_field(parser, field)

    fields = dataclasses.fields(config_class)
    types = [f.type for f in fields]
    try:
        return Parser(config_class)
    finally:
        for f, kind in zip(fields, types):
            f.type = kind


@pytest.mark.parametrize("config_class", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_every_own_field_has_help(config_class):
    fields = own_fields(config_class)
    assert len(fields) > 5  # the targets, and the method's own fields
    missing = [f.name for f in fields if len(str(f.metadata.get("help") or "").strip()) < MIN_HELP]
    assert not missing, f"{config_class.__name__}: fields without a help of at least {MIN_HELP} characters: {missing}"


@pytest.mark.parametrize("config_class", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_help_is_shown_by_hf_argument_parser(config_class):
    before = [f.type for f in dataclasses.fields(config_class)]
    text = squeeze(help_parser(config_class).format_help())
    assert [f.type for f in dataclasses.fields(config_class)] == before  # building the parser changed no field
    for f in own_fields(config_class):
        assert f"--{f.name}" in text
        assert squeeze(f.metadata["help"]) in text, f"{config_class.__name__}.{f.name}: help not in --help"


def test_help_is_per_class_where_fields_differ():
    """Fields of the same name in two methods (r, bias, rank_pattern) describe that method's meaning."""
    for name in ("r", "bias", "rank_pattern"):
        helps = {c.__name__: c.__dataclass_fields__[name].metadata["help"] for c in CONFIG_CLASSES
                 if name in c.__dataclass_fields__}
        assert len(set(helps.values())) == len(helps), (name, helps)
