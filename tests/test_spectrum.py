"""subspace_peft.spectrum: singular values equal a known construction, ranks follow the energy formula, peft's
target matching (all-linear included) selects the layers, the PNG is written, bad input is a clear error."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

import subspace_peft

from tiny_models import minilm


def with_singular_values(d_out: int, d_in: int, values: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(d_out, len(values), generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(d_in, len(values), generator=generator, dtype=torch.float64)).Q
    return (u * values) @ v.T


class Known(nn.Module):
    def __init__(self):
        super().__init__()
        self.wide = nn.Linear(12, 6)
        self.tall = nn.Linear(5, 10)
        self.conv = nn.Conv2d(3, 4, 2)  # a (4, 3*2*2) matrix
        self.norm = nn.LayerNorm(5)
        self.values = {
            "wide": torch.arange(6, 0, -1.0),
            "tall": torch.tensor([4.0, 2, 1, 1, 0.5]),
            "conv": torch.tensor([3.0, 1, 1, 1]),
        }
        with torch.no_grad():
            self.wide.weight.copy_(with_singular_values(6, 12, self.values["wide"].double(), 0))
            self.tall.weight.copy_(with_singular_values(10, 5, self.values["tall"].double(), 1))
            self.conv.weight.copy_(with_singular_values(4, 12, self.values["conv"].double(), 2).reshape(4, 3, 2, 2))


def test_singular_values_and_ranks_follow_the_construction():
    model = Known()
    report = subspace_peft.spectrum(model, ["wide", "tall", "conv"])
    assert list(report.layers) == ["wide", "tall", "conv"]
    for name, expected in model.values.items():
        layer = report.layers[name]
        assert torch.allclose(layer.singular_values, expected, rtol=1e-5)
        power = expected.double().pow(2)
        assert torch.allclose(layer.energy, power.cumsum(0) / power.sum(), rtol=1e-5)
    assert report.layers["conv"].shape == (4, 12)
    # wide: sigma^2 = 36, 25, 16, 9, 4, 1 (sum 91); 90% of 91 = 81.9 needs 36+25+16+9 = 86 -> rank 4
    assert report.ranks_for(0.9)["wide"] == 4
    # at the boundary: fp32 singular values hold 36 / 91 to ~1e-7
    assert report.layers["wide"].rank_for(36 / 91 - 1e-5) == 1 and report.layers["wide"].rank_for(36 / 91 + 1e-5) == 2
    # tall: 16, 4, 1, 1, 0.25 (sum 22.25); the top 2 hold 20 / 22.25
    assert report.energy_at(2)["tall"] == pytest.approx(20 / 22.25, rel=1e-6)
    assert report.energy_at(100)["tall"] == pytest.approx(1.0)  # capped at min(d_out, d_in)
    with pytest.raises(ValueError, match="rank must lie in"):
        report.layers["tall"].energy_at(6)


def test_all_linear_on_a_pretrained_model_and_through_a_peft_model(tmp_path):
    base = minilm()
    report = subspace_peft.spectrum(base, "all-linear")
    linear = [n for n, m in base.named_modules() if isinstance(m, nn.Linear)]
    # peft's all-linear leaves out a model's output layer; MiniLM (BertModel) has none, so every Linear is read
    assert set(report.layers) == set(linear) and len(linear) == 6 * 6 + 1
    query = report.layers["encoder.layer.0.attention.self.query"]
    assert query.shape == (384, 384)
    exact = torch.linalg.svdvals(base.encoder.layer[0].attention.self.query.weight.detach())
    assert torch.allclose(query.singular_values, exact, rtol=1e-5)
    # a PeftModel is read through its base weights (PiSSA never rewrites them)
    adapted = get_peft_model(minilm(), subspace_peft.PiSSAConfig(r=4, target_modules=["query", "value"]))
    through = subspace_peft.spectrum(adapted, ["query", "value"])
    assert torch.allclose(
        through.layers["encoder.layer.0.attention.self.query"].singular_values, query.singular_values, rtol=1e-6
    )
    table = report.summary(energy=0.9, rank=16)
    assert "| query | 6 | 384x384 |" in table and "| dense | 19 |" in table
    png = report.plot(tmp_path / "spectrum.png", energy=0.9, title="MiniLM")
    with open(png, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[:2] == (540, 1440)  # 12 x 4.5 inches at 120 dpi


@pytest.mark.parametrize(
    "targets, message",
    [
        (["nothing_here"], "matched no module"),
        (["norm"], "LayerNorm"),
    ],
)
def test_bad_targets(targets, message):
    with pytest.raises(ValueError, match=message):
        subspace_peft.spectrum(Known(), targets)


def test_a_quantised_weight_is_named():
    model = Known()
    model.wide.weight = nn.Parameter(torch.zeros(6, 12, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="'wide' holds a torch.int8"):
        subspace_peft.spectrum(model, ["wide"])


def test_exclude_modules():
    report = subspace_peft.spectrum(Known(), ["wide", "tall"], exclude_modules=["tall"])
    assert list(report.layers) == ["wide"]
