"""Every numeric knob of the tuner configs: finite and in range, else a ValueError naming the field and the fix,
raised before the model is touched (merging, spectrum and hub knobs: tests/test_numerics_merging.py)."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model

from subspace_peft import EffortConfig, FLoRAConfig, PiSSAConfig, SVFitConfig

from parity import assert_refused_unchanged
from tiny_models import build, inputs

NAN, INF = math.nan, math.inf
TARGETS = dict(target_modules=["lin0", "lin1"])

BAD = [
    # PiSSA: the scale s = lora_alpha / r enters sqrt(S / s) (paper eq. 2-3); alpha <= 0 gave NaN outputs
    (PiSSAConfig, dict(lora_alpha=0), r"lora_alpha must be a finite number > 0, got 0; .*lora_alpha = r"),
    (PiSSAConfig, dict(lora_alpha=-8), r"lora_alpha must be a finite number > 0"),
    (PiSSAConfig, dict(lora_alpha=NAN), r"lora_alpha must be a finite number"),
    (PiSSAConfig, dict(lora_alpha=INF), r"lora_alpha must be a finite number"),
    (PiSSAConfig, dict(alpha_pattern={"lin1": -1.0}), r"alpha_pattern\['lin1'\] must be a finite number > 0"),
    (PiSSAConfig, dict(alpha_pattern={"lin1": NAN}), r"alpha_pattern\['lin1'\] must be a finite number"),
    (PiSSAConfig, dict(rank_pattern={"lin1": 2.5}), r"rank_pattern\['lin1'\] must be an integer >= 1"),
    (PiSSAConfig, dict(r=4.0), r"r must be an integer >= 1, got 4.0"),
    (PiSSAConfig, dict(lora_dropout=NAN), r"lora_dropout must be a finite number in \[0, 1\)"),
    (PiSSAConfig, dict(lora_dropout=-0.1), r"lora_dropout must be a finite number in \[0, 1\)"),
    (PiSSAConfig, dict(init="randomized", niter=65), r"niter must be an integer in \[0, 64\]"),
    (PiSSAConfig, dict(init="randomized", oversample=-1), r"oversample must be an integer in \[0, 4096\]"),
    (PiSSAConfig, dict(svd_cache=3), r"svd_cache must be None, True or a folder path"),
    # SVFit
    (SVFitConfig, dict(energy=NAN), r"energy must be a finite number in \(0, 1\]"),
    (SVFitConfig, dict(energy=-0.5), r"energy must be a finite number in \(0, 1\]"),
    (SVFitConfig, dict(r=0), r"r must be an integer >= 1"),
    (SVFitConfig, dict(energy_ranks={"lin0": 0}), r"energy_ranks\['lin0'\] must be an integer >= 1"),
    # Effort: a NaN weight gave a NaN loss
    (EffortConfig, dict(orth_weight=NAN), r"orth_weight must be a finite number >= 0.*switches that loss off"),
    (EffortConfig, dict(norm_weight=INF), r"norm_weight must be a finite number >= 0"),
    (EffortConfig, dict(norm_weight=-1e-3), r"norm_weight must be a finite number >= 0"),
    (EffortConfig, dict(residual_rank=True), r"residual_rank must be an integer >= 1"),
    (EffortConfig, dict(rank_pattern={"lin0": -1}), r"rank_pattern\['lin0'\] must be an integer >= 1"),
    # FLoRA
    (FLoRAConfig, dict(scale=NAN), r"scale must be a finite number"),
    (FLoRAConfig, dict(scale=-INF), r"scale must be a finite number"),
    (FLoRAConfig, dict(flora_dropout=1.5), r"flora_dropout must be a finite number in \[0, 1\)"),
    (FLoRAConfig, dict(r=0), r"r must be a positive int"),
    # every method: layer indices
    (PiSSAConfig, dict(layers_to_transform=[-1], layers_pattern="layers"), r"layers_to_transform must be an integer"),
]


@pytest.mark.parametrize(
    "config_cls, kwargs, message",
    BAD,
    ids=[f"{cls.__name__}-{next(iter(kw))}-{i}" for i, (cls, kw, _) in enumerate(BAD)],
)
def test_bad_numeric_value_is_refused_naming_the_field_before_the_model_changes(config_cls, kwargs, message):
    torch.manual_seed(0)
    assert_refused_unchanged(build("mlp"), lambda: config_cls(**{**TARGETS, **kwargs}), message)


@pytest.mark.parametrize(
    "config",
    [
        PiSSAConfig(r=4, lora_alpha=0.5, alpha_pattern={"lin1": 64}, **TARGETS),
        EffortConfig(residual_rank=2, orth_weight=0.0, norm_weight=1e-3, **TARGETS),
        FLoRAConfig(r=2, scale=-2.0, **TARGETS),
        SVFitConfig(energy=1.0, **TARGETS),
    ],
    ids=["pissa", "effort", "flora", "svfit"],
)
def test_values_at_the_edges_of_their_ranges_give_finite_outputs(config):
    model = get_peft_model(build("mlp"), config)
    model.train()
    out = model(**inputs("mlp"))
    loss = out.float().pow(2).mean()  # Effort's regularisers reach the gradient through its layers
    loss.backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad and p.grad is not None)
