"""A sixth method written the way CONTRIBUTING.md says: one folder's worth of code on the family base (a config, one
layer class, one tuner) and one record. "TopScale" trains one number per layer, a multiplier of the weight's top
singular component: ``y = base(x) + (c - 1) s_1 u_1 v_1^T x`` with ``c`` starting at 1. Everything the base gives a
method (SVD at init, empty layers on reload, merge, export to LoRA, mixed batches) must work for it unchanged."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import PeftModel, get_peft_model
from peft.utils.peft_types import PeftType
from torch import nn

import subspace_peft
from subspace_peft.registry import Method, register
from subspace_peft.tuners.base import FactorLayer, LayerPlan, SingularValues, SVDTuner
from subspace_peft.tuners.base.config import SVDInitConfig

from tiny_models import build, inputs

TOL = 1e-5


@dataclass
class TopScaleConfig(SVDInitConfig):
    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.TOPSCALE


class TopScaleLayer(FactorLayer):
    adapter_layer_names = ("topscale_c",)
    other_param_names = ("topscale_Vh", "topscale_U", "topscale_s", "r")

    def _init_adapter_containers(self) -> None:
        self.topscale_c, self.topscale_Vh = nn.ModuleDict({}), nn.ModuleDict({})
        self.topscale_U, self.topscale_s = nn.ModuleDict({}), nn.ModuleDict({})

    def update_layer(self, adapter_name: str, plan: LayerPlan) -> None:
        self.r[adapter_name] = plan.r
        factors = plan.factors
        vectors = None if factors is None else factors[:2]
        self.topscale_Vh[adapter_name], self.topscale_U[adapter_name] = self._new_factors(1, vectors, trainable=False)
        device = self.get_base_layer().weight.device
        self.topscale_s[adapter_name] = SingularValues(1, device, trainable=False)  # s_1, frozen
        self.topscale_c[adapter_name] = SingularValues(1, device)  # the multiplier, trained from 1
        if factors is not None:
            with torch.no_grad():
                self.topscale_s[adapter_name].weight.copy_(factors[2])
                self.topscale_c[adapter_name].weight.fill_(1.0)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _scale(self, adapter: str) -> torch.Tensor:
        return (self.topscale_c[adapter].weight - 1) * self.topscale_s[adapter].weight

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        vh, u = self.geometry.factor_matrices(self.topscale_Vh[adapter].weight, self.topscale_U[adapter].weight)
        return self.geometry.delta_from_matrix(u @ (self._scale(adapter).float()[:, None] * vh.float()))

    def lora_factors(self, adapter: str):
        vh, u = self.geometry.factor_matrices(self.topscale_Vh[adapter].weight, self.topscale_U[adapter].weight)
        return self._scale(adapter).float()[:, None] * vh.float(), u.float(), 1.0

    def _adapter_output(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        scale = self._scale(adapter)
        vh, u = self.topscale_Vh[adapter].weight, self.topscale_U[adapter].weight
        return self.geometry.low_rank(x, vh.to(scale.dtype), u.to(scale.dtype), scale=scale)


class TopScaleModel(SVDTuner):
    prefix = "topscale_"
    method_name = "TopScale"
    tuner_layer_cls = TopScaleLayer

    def _rank(self, target, config) -> int:
        return 1


TOPSCALE = Method(
    "topscale", TopScaleConfig, TopScaleModel, display_name="TopScale", card_fields=("init",), frozen_buffers=True
)
register(TOPSCALE)  # the one record: peft now knows the type, its config, its tuner and its prefix


def _trained(seed: int = 0):
    model = get_peft_model(build("mlp"), TopScaleConfig(target_modules=["lin0", "lin1"]))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.5 + seed)
    return model.eval()


def _out(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs("mlp"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_the_toy_starts_at_the_base_model_and_trains_one_number_per_layer():
    base_out = _out(build("mlp"))
    model = get_peft_model(build("mlp"), TopScaleConfig(target_modules=["lin0", "lin1"]))
    assert _rel(_out(model), base_out) <= TOL
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2  # one multiplier per layer
    assert all("topscale_c" in n for n, p in model.named_parameters() if p.requires_grad)


def test_the_toy_reloads_without_an_svd_and_merges_exports_and_mixes_like_the_others(tmp_path, monkeypatch):
    model = _trained()
    expected = _out(model)
    assert _rel(expected, _out(build("mlp"))) > 1e-3
    model.save_pretrained(tmp_path / "toy")
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: (_ for _ in ()).throw(AssertionError("SVD on reload")))
    reloaded = PeftModel.from_pretrained(build("mlp"), tmp_path / "toy").eval()
    assert _rel(_out(reloaded), expected) <= TOL
    monkeypatch.undo()
    assert _rel(_out(reloaded.merge_and_unload()), expected) <= TOL
    subspace_peft.export_lora(model, tmp_path / "lora")
    lora = PeftModel.from_pretrained(build("mlp"), tmp_path / "lora").eval()
    assert _rel(_out(lora), expected) <= TOL
    model.add_adapter("other", TopScaleConfig(target_modules=["lin0", "lin1"]))
    x = inputs("mlp")["x"]
    with torch.no_grad():
        mixed = model(x=x, adapter_names=["default", "__base__", "default", "__base__"])
    assert _rel(mixed[0::2], expected[0::2]) <= TOL and _rel(mixed[1::2], _out(build("mlp"))[1::2]) <= TOL
    assert "TopScale" in subspace_peft.model_card(model, "me/topscale")


def test_the_toy_goes_through_the_recipe_and_its_guards_by_its_record():
    import os
    import sys

    import pytest

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes"))
    from subspace_peft.recipe_tools import RecipeError

    from finetune import FinetuneRecipe, peft_config
    from guards import launch_problem

    names = [name for name, _ in get_peft_model(build("mlp"), TopScaleConfig(target_modules=["lin0"])).named_buffers()]
    assert bool(names) == TOPSCALE.frozen_buffers  # the record tells the truth the guards act on
    recipe = FinetuneRecipe(method="topscale", method_config={"target_modules": ["q_proj"]})
    assert recipe.record is TOPSCALE and isinstance(peft_config(recipe), TopScaleConfig)
    fsdp_efficient = {"ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}
    assert "fsdp_cpu_ram_efficient_loading: false" in launch_problem(TOPSCALE, "none", fsdp_efficient)
    with pytest.raises(RecipeError, match=r"quantised base: 'lora' \(QLoRA\) or 'pissa' \(QPiSSA\)\. topscale takes"):
        FinetuneRecipe(method="topscale", quantization="4bit")
