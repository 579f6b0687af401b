"""One record per method, one registry of merge methods: a new method is its tuner plus one record, and every table
(peft's registry, the model card, the recipes, the README) reads the records."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch
import yaml
from peft import PeftConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.peft_types import PeftType
from torch import nn

import subspace_peft
from subspace_peft import merging
from subspace_peft.hub import model_card
from subspace_peft.methods import DEFAULT_METHOD, METHODS
from subspace_peft.registry import Method, Paper, known_methods, method_record, register, registered_methods

from tiny_models import build, inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "recipes"))

import merge as merge_recipe  # noqa: E402

# -- a toy method, defined here: a learned shift added to each targeted Linear's output --------------------------------


@dataclass
class ToyShiftConfig(PeftConfig):
    target_modules: Optional[list] = field(default=None)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.TOYSHIFT


class ToyShiftLayer(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("toyshift_shift",)

    def __init__(self, base_layer: nn.Linear, adapter_name: str):
        super().__init__()
        self.base_layer = base_layer
        self.toyshift_shift = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters = []
        self.update_layer(adapter_name)

    def update_layer(self, adapter_name: str) -> None:
        self.toyshift_shift[adapter_name] = nn.Parameter(torch.zeros(self.base_layer.out_features))
        self.set_adapter(self.active_adapters)

    def forward(self, x, *args, **kwargs):
        out = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return out
        return out + sum(self.toyshift_shift[name] for name in self.active_adapters if name in self.toyshift_shift)


class ToyShiftModel(BaseTuner):
    prefix = "toyshift_"
    tuner_layer_cls = ToyShiftLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, ToyShiftLayer):
            target.update_layer(adapter_name)
        else:
            setattr(parent, target_name, ToyShiftLayer(target, adapter_name))


TOY = Method(
    "toyshift",
    ToyShiftConfig,
    ToyShiftModel,
    display_name="ToyShift",
    card_fields=("target_modules",),
    paper=Paper("A toy", "Nobody", 2026, "https://example.com/toy"),
)


def test_a_new_method_is_one_record(tmp_path):
    register(TOY)
    model = get_peft_model(build("mlp"), ToyShiftConfig(target_modules=["lin0", "lin1"]))
    assert model.get_nb_trainable_parameters()[0] == 40
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "toyshift_shift" in name:
                parameter.normal_()
    expected = model(**inputs("mlp"))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build("mlp"), tmp_path)
    assert type(loaded.peft_config["default"]) is ToyShiftConfig
    torch.testing.assert_close(loaded(**inputs("mlp")), expected)
    card = model_card(loaded, "me/toy")
    assert "A ToyShift adapter" in card and "- method: ToyShift (peft_type `TOYSHIFT`)" in card
    assert "import subspace_peft  # registers TOYSHIFT with peft" in card and "- subspace-peft" in card


def test_registering_twice_changes_nothing():
    register(TOY)
    mapping, prefixes, members = dict(PEFT_TYPE_TO_CONFIG_MAPPING), dict(PEFT_TYPE_TO_PREFIX_MAPPING), list(PeftType)
    for method in (TOY, *METHODS):
        register(method)
    assert dict(PEFT_TYPE_TO_CONFIG_MAPPING) == mapping and dict(PEFT_TYPE_TO_PREFIX_MAPPING) == prefixes
    assert list(PeftType) == members and members.count(PeftType.TOYSHIFT) == 1
    assert registered_methods()["toyshift"] is TOY


def test_a_name_peft_already_has_is_a_clear_error():
    with pytest.raises(KeyError, match="peft already has a method called 'lora' from another package"):
        register(Method("lora", ToyShiftConfig, ToyShiftModel))
    with pytest.raises(KeyError, match="peft already has a method called 'pissa'"):
        register(Method("pissa", ToyShiftConfig, ToyShiftModel))
    assert PEFT_TYPE_TO_CONFIG_MAPPING["LORA"].__name__ == "LoraConfig"
    assert PEFT_TYPE_TO_CONFIG_MAPPING["PISSA"] is subspace_peft.PiSSAConfig


def test_every_record_agrees_with_its_classes():
    assert {m.name for m in METHODS} <= {m.name for m in known_methods()}
    assert {m.name for m in METHODS if not m.peft_builtin} <= set(registered_methods())
    for method in known_methods():
        assert method.prefix == method.model_cls.prefix, method.name
        assert method.config_cls().peft_type == PeftType[method.peft_type], method.name
        assert method_record(PeftType[method.peft_type]) is method
        fields = {f.name for f in dataclasses.fields(method.config_cls)}
        assert set(method.card_fields) <= fields and set(method.recipe_defaults) <= fields, method.name
        if not method.peft_builtin:
            assert PEFT_TYPE_TO_CONFIG_MAPPING[method.peft_type] is method.config_cls, method.name
            assert PEFT_TYPE_TO_PREFIX_MAPPING[method.peft_type] == method.prefix, method.name


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_recipe_defaults_are_the_recipe_configs(method):
    with open(os.path.join(ROOT, "recipes", "configs", f"{method.name}.yaml"), encoding="utf-8") as handle:
        recipe = yaml.safe_load(handle)
    assert recipe["method"] == method.name
    assert {k: v for k, v in recipe["method_config"].items() if k != "svd_cache"} == method.recipe_defaults
    assert recipe["training"]["learning_rate"] == method.recipe_learning_rate
    method.config_cls(**method.recipe_defaults)


def test_the_recipes_read_the_records():
    import finetune

    assert finetune.METHODS == tuple(m.name for m in METHODS)
    assert finetune.FinetuneRecipe().method == DEFAULT_METHOD.name
    assert finetune.FinetuneRecipe().method_config == dict(DEFAULT_METHOD.recipe_defaults)
    assert merge_recipe.METHODS == tuple(merging.MERGE_METHODS)


# -- the README's tables are the records' --------------------------------------------------------------------------


def readme_table(header: str, document: str = "README.md") -> list[list[str]]:
    with open(os.path.join(ROOT, document), encoding="utf-8") as handle:
        text = handle.read()
    rows = text[text.index(header) :].split("\n\n")[0].splitlines()[2:]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def paper_link(paper: Paper) -> str:
    return f"[{paper.authors}, {paper.year}]({paper.url})"


def test_readme_method_table_rows_are_the_records():
    rows = [
        row
        for row in readme_table("| method | config | paper | status | what trains | guide |")
        if row[1] != "`subspace_peft.merging`"
    ]
    ours = [method for method in METHODS if not method.peft_builtin]
    assert [(row[0].split(" / ")[0], row[1], row[2]) for row in rows] == [
        (m.title, f"`{m.config_cls.__name__}`", paper_link(m.paper)) for m in ours
    ]
    for row, method in zip(rows, ours):  # each method's guide is its page under docs/
        page = f"docs/{method.name}.md"
        assert row[5] == f"[{page}]({page})" and os.path.isfile(os.path.join(ROOT, page)), row[5]


def test_the_merging_guide_table_rows_are_the_merge_registry():
    rows = readme_table("| method | name | parameters | paper |", "docs/merging.md")
    assert rows == [
        [m.title, f"`{m.name}`", ", ".join(f"`{p.name}`" for p in m.parameters), paper_link(m.paper)]
        for m in merging.MERGE_METHODS.values()
    ]


# -- the merge registry ----------------------------------------------------------------------------------------------


def test_the_merge_recipe_has_a_field_per_parameter_with_the_schema_default():
    recipe_fields = {f.name: f.default for f in dataclasses.fields(merge_recipe.MergeRecipe)}
    for method in merging.MERGE_METHODS.values():
        for parameter in method.parameters:
            assert recipe_fields[parameter.name] == parameter.default, (method.name, parameter.name)
            if parameter.choices:
                assert parameter.default in parameter.choices
    assert set(merging.MERGE_METHODS) == {
        "task_arithmetic",
        "ties",
        "dare",
        "adamerging",
        "concrete_task_arithmetic",
        "concrete_adamerging",
    }


def test_merge_by_name_fills_the_schema_defaults_and_refuses_unknown_parameters():
    base = build("mlp")
    generator = torch.Generator().manual_seed(0)
    vectors = [
        {name: 0.01 * torch.randn(p.shape, generator=generator) for name, p in base.named_parameters()}
        for _ in range(2)
    ]
    merged = merging.merge("ties", base, vectors, density=0.5)
    reference = merging.ties_merging(base, vectors, 0.3, 0.5)
    for got, want in zip(merged.model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(got, want)
    assert merged.masks is None
    with pytest.raises(ValueError, match=re.escape("ties has no parameter(s) ['drop_rate']")):
        merging.merge("ties", base, vectors, drop_rate=0.5)
    with pytest.raises(ValueError, match="no merge method 'average'"):
        merging.merge("average", base, vectors)
    with pytest.raises(ValueError, match="concrete_task_arithmetic needs unlabeled batches"):
        merging.merge("concrete_task_arithmetic", base, vectors)
