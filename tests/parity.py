"""The PEFT parity checklist (tests/PARITY.md) as data: a method plugs in by adding cases to CASES.

A case names a tiny model (tests/tiny_models.py), a config factory and the trainable-parameter count its formula
gives. tests/test_parity.py runs every check on every case.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Case:
    id: str
    model: str
    make_config: Callable  # (**overrides) -> PeftConfig
    trainable: int  # the method's formula, worked out by hand for this model
    peft_type: str = "PISSA"
    trainable_attrs: tuple = ("pissa_A", "pissa_B")  # the layer attributes whose parameters train
    identity_at_init: bool = True
    transformers_model: bool = False  # supports gradient checkpointing / inputs_embeds
    inits: tuple = ("svd", "randomized")  # the init modes save/reload is checked with (None: no init modes)
    exportable: bool = True  # export_lora applies (not to grouped convolutions)
    second_adapter: dict = field(default_factory=lambda: dict(init="randomized", seed=3))  # config of a 2nd adapter
    skip: dict = field(default_factory=dict)  # check name -> reason


def _config(name: str, **kwargs):
    def make(**overrides):
        import subspace_peft

        return getattr(subspace_peft, name)(**{**kwargs, **overrides})

    return make


def _pissa(**kwargs):
    return _config("PiSSAConfig", **kwargs)


def _svfit(**kwargs):
    return _config("SVFitConfig", **kwargs)


def _flora(**kwargs):
    return _config("FLoRAConfig", **kwargs)


def _effort(**kwargs):
    return _config("EffortConfig", **kwargs)


SVFIT = dict(peft_type="SVFIT", trainable_attrs=("svfit_delta",))
FLORA = dict(
    peft_type="FLORA",
    trainable_attrs=("flora_core",) + tuple(f"flora_A{m}" for m in range(5)),
    inits=(None,),
    second_adapter=dict(scale=2.0),
)
# Effort's minor components need an exact SVD: no randomized init
EFFORT = dict(
    peft_type="EFFORT",
    trainable_attrs=("effort_U", "effort_S", "effort_Vh"),
    inits=("svd",),
    second_adapter=dict(orth_weight=0.5),
)


KBIT_SKIP = "PiSSA needs a full-precision base to take the SVD from; its 4/8-bit path is QPiSSA (test_pissa.py)"

CASES = [
    # PiSSA: trainable = sum over targets of r * (d_out + d_in), d_in = c_in * prod(kernel) for convs
    Case("pissa-mlp", "mlp", _pissa(r=4, lora_alpha=8, target_modules=["lin0", "lin1"]), 4 * (10 + 20) + 4 * (20 + 20)),
    Case("pissa-conv1d", "conv1d", _pissa(r=2, lora_alpha=2, target_modules=["conv"]), 2 * (8 + 3 * 3)),
    Case(
        "pissa-conv2d",
        "conv2d",
        _pissa(r=3, lora_alpha=3, target_modules=["conv", "conv2"]),
        3 * (8 + 3 * 9) + 3 * (6 + 8),
    ),
    Case("pissa-conv3d", "conv3d", _pissa(r=2, lora_alpha=4, target_modules=["conv"]), 2 * (4 + 2 * 27)),
    Case(
        "pissa-embedding",
        "embedding",
        _pissa(r=4, lora_alpha=4, target_modules=["emb", "lin"], rank_pattern={"lin": 2}),
        4 * (12 + 30) + 2 * (3 + 12),
    ),
    Case(
        "pissa-gpt2-conv1D",
        "gpt2",
        _pissa(r=4, lora_alpha=4, target_modules=["c_attn"]),
        2 * 4 * (16 + 48),
        transformers_model=True,
    ),
    Case(
        "pissa-minilm",
        "minilm",
        _pissa(r=8, lora_alpha=8, target_modules=["query", "value"]),
        6 * 2 * 8 * (384 + 384),
        transformers_model=True,
    ),
    # SVFit: trainable = sum over targets of r (one singular value per rank)
    Case("svfit-mlp", "mlp", _svfit(r=4, target_modules=["lin0", "lin1"]), 4 + 4, **SVFIT),
    Case(
        "svfit-conv2d",
        "conv2d",
        _svfit(r=3, target_modules=["conv", "conv2"], rank_pattern={"conv2": 2}),
        3 + 2,
        **SVFIT,
    ),
    Case("svfit-conv1d", "conv1d", _svfit(r=2, target_modules=["conv"]), 2, **SVFIT),
    Case("svfit-conv3d", "conv3d", _svfit(r=2, target_modules=["conv"]), 2, **SVFIT),
    Case(
        "svfit-embedding",
        "embedding",
        _svfit(r=5, target_modules=["emb", "lin"], rank_pattern={"lin": 3}),
        5 + 3,
        **SVFIT,
    ),
    Case(
        "svfit-gpt2-conv1D",
        "gpt2",
        _svfit(r=4, target_modules=["c_attn", "c_proj"]),
        2 * 3 * 4,
        transformers_model=True,
        **SVFIT,
    ),
    Case(
        "svfit-minilm",
        "minilm",
        _svfit(r=16, target_modules=["query", "value"]),
        6 * 2 * 16,
        transformers_model=True,
        **SVFIT,
    ),
    # Effort: trainable = sum over targets of r * (d_out + d_in + 1) (U, s and V of the r minor components)
    Case("effort-mlp", "mlp", _effort(residual_rank=2, target_modules=["lin0", "lin1"]), 2 * 31 + 2 * 41, **EFFORT),
    Case(
        "effort-conv2d",
        "conv2d",
        _effort(residual_rank=2, target_modules=["conv", "conv2"], rank_pattern={"conv2": 1}),
        2 * (8 + 27 + 1) + (6 + 8 + 1),
        **EFFORT,
    ),
    Case("effort-conv1d", "conv1d", _effort(residual_rank=2, target_modules=["conv"]), 2 * (8 + 9 + 1), **EFFORT),
    Case("effort-conv3d", "conv3d", _effort(target_modules=["conv"]), 4 + 54 + 1, **EFFORT),
    Case(
        "effort-embedding",
        "embedding",
        _effort(residual_rank=2, target_modules=["emb", "lin"], rank_pattern={"lin": 1}),
        2 * (12 + 30 + 1) + (3 + 12 + 1),
        **EFFORT,
    ),
    Case(
        "effort-gpt2-conv1D",
        "gpt2",
        _effort(target_modules=["c_attn"]),
        2 * (16 + 48 + 1),
        transformers_model=True,
        **EFFORT,
    ),
    Case(
        "effort-minilm",
        "minilm",
        _effort(target_modules=["query", "value"]),
        6 * 2 * (384 + 384 + 1),
        transformers_model=True,
        **EFFORT,
    ),
    # FLoRA: trainable = sum over targets of sum_m size_m * r_m + prod_m r_m (an int r is min(r, size) per mode;
    # tuples are ordered (in, out, k_1, ...); a grouped conv's in-mode has size c_in / groups)
    Case(
        "flora-mlp",
        "mlp",
        _flora(r=3, target_modules=["lin0", "lin1"]),
        (10 * 3 + 20 * 3 + 3 * 3) + (20 * 3 + 20 * 3 + 3 * 3),
        **FLORA,
    ),
    Case(
        "flora-conv2d",
        "conv2d",
        _flora(conv_ranks=(2, 3, 2, 2), target_modules=["conv", "conv2"], scale=4.0, rank_pattern={"conv2": 2}),
        (3 * 2 + 8 * 3 + 3 * 2 + 3 * 2 + 2 * 3 * 2 * 2) + (8 * 2 + 6 * 2 + 1 + 1 + 2 * 2),
        **FLORA,
    ),
    Case("flora-conv1d", "conv1d", _flora(r=3, target_modules=["conv"]), 3 * 3 + 8 * 3 + 3 * 3 + 3**3, **FLORA),
    Case(
        "flora-conv3d", "conv3d", _flora(r=3, target_modules=["conv"]), 4 * 3 + 2 * 2 + 3 * 3 * 3 + 3 * 2 * 27, **FLORA
    ),
    Case(
        "flora-grouped",
        "grouped",
        _flora(
            conv_ranks=(1, 4, 2, 2), target_modules=["depthwise", "grouped"], rank_pattern={"grouped": (2, 3, 3, 1)}
        ),
        (1 * 1 + 4 * 4 + 3 * 2 + 3 * 2 + 1 * 4 * 2 * 2) + (2 * 2 + 6 * 3 + 3 * 3 + 1 * 1 + 2 * 3 * 3 * 1),
        exportable=False,
        **FLORA,
    ),
    Case(
        "flora-embedding",
        "embedding",
        _flora(r=3, target_modules=["emb", "lin"]),
        (30 * 3 + 12 * 3 + 9) + (12 * 3 + 3 * 3 + 9),
        **FLORA,
    ),
    Case(
        "flora-gpt2-conv1D",
        "gpt2",
        _flora(r=3, target_modules=["c_attn"]),
        2 * (16 * 3 + 48 * 3 + 9),
        transformers_model=True,
        **FLORA,
    ),
    Case(
        "flora-minilm",
        "minilm",
        _flora(r=8, target_modules=["query", "value"]),
        6 * 2 * (384 * 8 * 2 + 64),
        transformers_model=True,
        **FLORA,
    ),
]
for _case in CASES:
    _case.skip.setdefault(
        "kbit",
        KBIT_SKIP
        if _case.peft_type == "PISSA"
        else "SVD-initialised methods need a full-precision base to take the SVD from",
    )


def run_python(code: str, timeout: int = 600, env: dict | None = None) -> str:
    """Run ``code`` in a fresh interpreter with tests/ on sys.path (``env`` adds variables); returns stdout, raises
    with stderr on failure."""
    env = dict(os.environ, **(env or {}), PYTHONPATH=os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"child process failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


def assert_refused_unchanged(model, make_config, message: str) -> None:
    """``get_peft_model(model, make_config())`` raises a ValueError matching ``message`` and leaves ``model`` exactly
    as it was: the same modules and every tensor bit for bit (NaN where it was NaN)."""
    import pytest
    from peft import get_peft_model

    before = {k: v.clone() for k, v in model.state_dict().items()}
    structure = repr(model)
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, make_config())
    assert repr(model) == structure
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key].nan_to_num(), after[key].nan_to_num()), key
        assert torch.equal(before[key].isnan(), after[key].isnan()), key


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
