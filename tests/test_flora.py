"""FLoRA-specific checks: the Tucker product against tensorly, parameter counts, grouped/depthwise convolutions,
export rank, bad input."""

from __future__ import annotations

import pytest
import tensorly
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from torch import nn

import subspace_peft
from subspace_peft import FLoRAConfig
from subspace_peft.linalg.tucker import tucker_to_tensor
from subspace_peft.tuners.flora.layer import FLoRALayer

from parity import assert_refused_unchanged, rel_err
from tiny_models import build

tensorly.set_backend("pytorch")


def flora_layers(model):
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, FLoRALayer)}


def randomise(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator))


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.plain = nn.Conv2d(6, 8, (3, 2), stride=2, padding=1, dilation=(1, 2))
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 4, 3, padding="same", groups=4, padding_mode="reflect")
        self.conv3d = nn.Conv3d(2, 3, (2, 3, 3))

    def forward(self, x):
        y = self.grouped(torch.relu(self.depthwise(self.plain(x))))
        return y.sum() + self.conv3d(x[:, :2].unsqueeze(2).expand(-1, -1, 3, -1, -1)).sum()


@pytest.mark.parametrize(
    "shape, ranks", [((5, 4), (2, 3)), ((6, 3, 3, 2), (2, 3, 2, 1)), ((4, 2, 2, 3, 3), (3, 2, 1, 2, 3))]
)
def test_tucker_product_matches_tensorly(shape, ranks):
    generator = torch.Generator().manual_seed(0)
    core = torch.randn(ranks, generator=generator, dtype=torch.float64)
    factors = [torch.randn(size, rank, generator=generator, dtype=torch.float64) for size, rank in zip(shape, ranks)]
    ours = tucker_to_tensor(core, factors)
    assert ours.shape == shape
    assert rel_err(ours, tensorly.tucker_to_tensor((core, factors))) <= 1e-12


@pytest.mark.parametrize("name", ["plain", "depthwise", "grouped", "conv3d"])
def test_conv_update_is_the_scaled_tucker_product_and_applies_like_the_base(name):
    model = get_peft_model(Convs(), FLoRAConfig(r=2, scale=4.0, target_modules=[name]))
    randomise(model)
    layer = flora_layers(model)[name]
    base = layer.get_base_layer()
    core = layer.flora_core["default"].weight.detach().double()
    factors = [f.detach().double() for f in layer._factors("default")]
    expected = 4.0 * tensorly.tucker_to_tensor((core, factors))
    assert expected.shape == base.weight.shape
    assert rel_err(layer.get_delta_weight("default"), expected) <= 1e-6
    inputs = {
        "plain": torch.randn(2, 6, 9, 9),
        "depthwise": torch.randn(2, 8, 6, 6),
        "grouped": torch.randn(2, 8, 6, 6),
        "conv3d": torch.randn(2, 2, 3, 6, 6),
    }[name]
    adapted = base._conv_forward(inputs, base.weight + expected.float(), base.bias)
    assert rel_err(layer(inputs), adapted) <= 1e-5


def test_parameter_counts_follow_the_formulas():
    model = get_peft_model(
        Convs(),
        FLoRAConfig(
            conv_ranks=(2, 3, 2, 1), target_modules=["plain", "grouped"], rank_pattern={"grouped": (1, 2, 3, 3)}
        ),
    )
    r_in, r_out, r_h, r_w = 2, 3, 2, 1
    plain = (
        6 * r_in + 8 * r_out + 3 * r_h + 2 * r_w + r_in * r_out * r_h * r_w
    )  # c_in*r1 + c_out*r2 + kh*r3 + kw*r4 + prod
    grouped = (8 // 4) * 1 + 4 * 2 + 3 * 3 + 3 * 3 + 1 * 2 * 3 * 3  # the in-mode has c_in / groups = 2 entries
    assert model.get_nb_trainable_parameters()[0] == plain + grouped
    linear = get_peft_model(build("mlp"), FLoRAConfig(target_modules=["lin0"], rank_pattern={"lin0": (3, 5)}))
    assert linear.get_nb_trainable_parameters()[0] == 10 * 3 + 20 * 5 + 3 * 5  # d_in*r_in + d_out*r_out + r_in*r_out


def test_an_int_rank_is_capped_at_each_mode_size():
    model = get_peft_model(Convs(), FLoRAConfig(r=4, target_modules=["depthwise", "grouped"]))
    layers = flora_layers(model)
    assert layers["depthwise"].r["default"] == (4, 1, 3, 3)  # weight order (out, in, k_h, k_w); depthwise in-mode = 1
    assert layers["grouped"].r["default"] == (4, 2, 3, 3)


def test_export_linear_is_exact_at_rank_min_of_the_two_ranks(tmp_path):
    model = get_peft_model(
        build("mlp"),
        FLoRAConfig(target_modules=["lin0", "lin1"], scale=2.0, rank_pattern={"lin0": (2, 5), "lin1": (6, 3)}),
    )
    randomise(model)
    config = subspace_peft.export_lora(model, tmp_path)
    assert config.rank_pattern == {"^lin0$": 2, "^lin1$": 3}
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert state["base_model.model.lin0.lora_A.weight"].shape == (2, 10)
    assert state["base_model.model.lin1.lora_B.weight"].shape == (20, 3)


def test_export_refuses_a_grouped_convolution_and_writes_nothing(tmp_path):
    model = get_peft_model(Convs(), FLoRAConfig(r=2, target_modules=["plain", "grouped"]))
    with pytest.raises(ValueError, match="grouped convolution .*merge_and_unload"):
        subspace_peft.export_lora(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target_modules=["lin0"], rank_pattern={"lin0": (2, 3, 4)}), r"3 entries.*2 modes \(in, out\)"),
        (dict(target_modules=["lin0"], rank_pattern={"lin0": (11, 3)}), r"mode 'in' of layer 'lin0' exceeds .* 10"),
        (dict(target_modules=["lin0"], rank_pattern={"lin0": (2, 0)}), r"positive int"),
        (dict(target_modules=["lin0"], r=0), r"r must be a positive int"),
        (dict(target_modules=["lin0"], conv_ranks=(4, 4)), r"conv_ranks needs one rank per mode"),
        (dict(target_modules=["lin0"], flora_dropout=1.0), r"flora_dropout must be a finite number in \[0, 1\)"),
    ],
)
def test_bad_input_on_linear_raises_before_anything_changes(kwargs, message):
    assert_refused_unchanged(build("mlp"), lambda: FLoRAConfig(**kwargs), message)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(target_modules=["plain", "depthwise"], conv_ranks=(2, 2, 2, 2)),
            r"mode 'in' of layer 'depthwise' exceeds that mode's size 1 \(a depthwise/grouped convolution",
        ),
        (dict(target_modules=["plain", "conv3d"], conv_ranks=(2, 2, 2, 2)), r"'conv3d' have 4 entries.*5 modes"),
        (dict(target_modules=["plain"], conv_ranks=(2, 2, 4, 1)), r"mode 'k_1' of layer 'plain' exceeds .* 3"),
    ],
)
def test_bad_conv_ranks_raise_before_anything_changes(kwargs, message):
    assert_refused_unchanged(Convs(), lambda: FLoRAConfig(**kwargs), message)  # no FLoRA layer either: same repr
