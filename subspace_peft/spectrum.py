"""Singular-value spectra of a model's weights: how much of each weight the top-r singular subspace holds.

``spectrum(model, target_modules)`` answers "which rank keeps 90% of this layer?" before choosing a PiSSA or SVFit
rank (or an Effort ``residual_rank``), and draws every layer's energy curve into one PNG.
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .checks import all_finite
from .linalg.svd import energy_rank, singular_values


def _check_energy(energy, where: str) -> float:
    if isinstance(energy, bool) or not isinstance(energy, numbers.Real) or not 0.0 < float(energy) <= 1.0:
        raise ValueError(
            f"{where}: energy must be a share in (0, 1] of sum(sigma^2), got {energy!r}; pass e.g. energy=0.9 (90%)"
        )
    return float(energy)


def _check_rank(rank, where: str) -> int:
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 0:
        raise ValueError(f"{where}: rank must be an integer >= 0, got {rank!r}; pass e.g. rank=16")
    return int(rank)


@dataclass(frozen=True)
class LayerSpectrum:
    """The singular values of one weight, as the (d_out, d_in) matrix an adapter factorises.

    A layer whose weight is all zeros has no energy (sum(sigma^2) = 0) and is exactly its rank-0 approximation: its
    :meth:`rank_for` is 0 for every share and its :meth:`energy_at` is 1.0 for every rank (the top r, r = 0
    included, keep all of nothing: the approximation error is zero), so it asks for no adapter rank. Ranks never
    exceed min(d_out, d_in) and shares are never NaN.
    """

    name: str
    shape: tuple[int, int]
    singular_values: torch.Tensor  # descending, float32, on the CPU

    @property
    def total_energy(self) -> float:
        """sum(sigma^2), the squared Frobenius norm of the weight (0 for an all-zero weight)."""
        return float(self.singular_values.double().pow(2).sum())

    @property
    def energy(self) -> torch.Tensor:
        """Share of sum(sigma^2) (the squared Frobenius norm) kept by the top r, for r = 1 .. min(shape); all ones
        for an all-zero weight (see the class docstring)."""
        power = self.singular_values.double().pow(2)
        total = power.sum()
        if total == 0:
            return torch.ones_like(power)
        return (power.cumsum(0) / total).clamp_max(1.0)

    def rank_for(self, energy: float) -> int:
        """The smallest rank whose top singular values hold at least ``energy`` (in (0, 1]) of sum(sigma^2): between
        1 and min(d_out, d_in), or 0 for an all-zero weight."""
        energy = _check_energy(energy, f"rank_for of layer '{self.name}'")
        if len(self.singular_values) == 0 or self.total_energy == 0:
            return 0
        return min(energy_rank(self.singular_values, energy), len(self.singular_values))

    def energy_at(self, rank: int) -> float:
        """Share of sum(sigma^2) in the top ``rank`` singular values, ``rank`` in [0, min(d_out, d_in)]: 0.0 at rank 0
        (1.0 for an all-zero weight, which every rank keeps whole)."""
        rank = _check_rank(rank, f"energy_at of layer '{self.name}'")
        if rank > len(self.singular_values):
            raise ValueError(
                f"energy_at of layer '{self.name}': rank must lie in [0, {len(self.singular_values)}] "
                f"(min(d_out, d_in)), got {rank}"
            )
        if self.total_energy == 0:
            return 1.0
        return 0.0 if rank == 0 else float(self.energy[rank - 1])

    @property
    def kind(self) -> str:
        """The last part of the module name (``q_proj``, ``query``, ...): layers of one kind are drawn alike."""
        return self.name.rsplit(".", 1)[-1]


@dataclass
class Spectrum:
    layers: dict[str, LayerSpectrum]

    def ranks_for(self, energy: float) -> dict[str, int]:
        """Each layer's :meth:`LayerSpectrum.rank_for` (0 for an all-zero layer)."""
        energy = _check_energy(energy, "ranks_for")
        return {name: layer.rank_for(energy) for name, layer in self.layers.items()}

    def energy_at(self, rank: int) -> dict[str, float]:
        """Share of each layer's energy in its top ``rank`` (an integer >= 0, capped at the layer's min(d_out, d_in);
        1.0 for an all-zero layer)."""
        rank = _check_rank(rank, "energy_at")
        return {name: layer.energy_at(min(rank, len(layer.singular_values))) for name, layer in self.layers.items()}

    def by_kind(self) -> dict[str, list[LayerSpectrum]]:
        kinds: dict[str, list[LayerSpectrum]] = {}
        for layer in self.layers.values():
            kinds.setdefault(layer.kind, []).append(layer)
        return kinds

    def summary(self, energy: float = 0.9, rank: int = 16) -> str:
        """A markdown table per layer kind: shape, median rank keeping ``energy``, median energy in the top ``rank``."""
        energy, rank = _check_energy(energy, "summary"), _check_rank(rank, "summary")
        lines = [
            f"| layers | count | shape | median rank for {energy:.0%} energy | median energy in top {rank} |",
            "|---|---|---|---|---|",
        ]
        for kind, layers in self.by_kind().items():
            ranks = torch.tensor([layer.rank_for(energy) for layer in layers], dtype=torch.float64)
            kept = torch.tensor([layer.energy_at(min(rank, len(layer.singular_values))) for layer in layers])
            shapes = sorted({layer.shape for layer in layers})
            shape = " ".join(f"{a}x{b}" for a, b in shapes)
            lines.append(
                f"| {kind} | {len(layers)} | {shape} | {ranks.median().item():.0f} of "
                f"{min(layers[0].shape)} | {kept.median().item():.3f} |"
            )
        return "\n".join(lines)

    def plot(self, path: Union[str, os.PathLike], energy: float = 0.9, title: Optional[str] = None) -> str:
        """Save a PNG: left, every layer's cumulative energy against rank (one colour per layer kind); right, the
        rank keeping ``energy`` per layer, in model order. Returns the path."""
        energy = _check_energy(energy, "plot")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, (curves, ranks) = plt.subplots(1, 2, figsize=(12, 4.5))
        colours = plt.get_cmap("tab10")
        order = {name: position for position, name in enumerate(self.layers)}
        for index, (kind, layers) in enumerate(self.by_kind().items()):
            colour = colours(index % 10)
            for number, layer in enumerate(layers):
                steps = torch.arange(1, len(layer.singular_values) + 1)
                curves.plot(
                    steps.numpy(),
                    layer.energy.numpy(),
                    color=colour,
                    alpha=0.35,
                    linewidth=0.8,
                    label=kind if number == 0 else None,
                )
            ranks.scatter(
                [order[layer.name] for layer in layers],
                [layer.rank_for(energy) for layer in layers],
                color=colour,
                s=10,
                label=kind,
            )
        curves.axhline(energy, color="grey", linestyle="--", linewidth=0.8)
        curves.set(xscale="log", xlabel="rank r", ylabel="share of sum(sigma^2) in the top r", title="energy curves")
        curves.legend(fontsize=7)
        ranks.set(
            xlabel="layer (model order)",
            ylabel=f"rank for {energy:.0%} energy",
            title=f"rank keeping {energy:.0%} of each layer",
        )
        ranks.legend(fontsize=7)
        if title:
            figure.suptitle(title)
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)
        return os.fspath(path)


def spectrum(
    model: nn.Module,
    target_modules: Union[str, Sequence[str]] = "all-linear",
    exclude_modules: Union[str, Sequence[str], None] = None,
    show_progress: bool = True,
) -> Spectrum:
    """Singular values of every weight ``target_modules`` selects (peft's matching rules, "all-linear" included).

    Works on a transformers model, any nn.Module (with explicit names) or a PeftModel (the base weights are read).
    Weights are decomposed in fp32 on their own device. A selected layer that is not a Linear, Conv1D, ConvNd or
    Embedding, whose weight is not floating point, or holds NaN or Inf, is a ValueError naming it. An all-zero weight
    is read as rank 0 (see :class:`LayerSpectrum`).

    >>> report = spectrum(model, "all-linear")
    >>> report.ranks_for(0.9)          # {"model.layers.0.self_attn.q_proj": 301, ...}
    >>> report.plot("spectrum.png")
    """
    from peft import LoraConfig, PeftModel
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists
    from tqdm.auto import tqdm

    from .tuners.base.geometry import SUPPORTED_NAMES, SUPPORTED_TYPES, weight_matrix
    from .tuners.base.targets import base_layer_of

    if isinstance(model, PeftModel):
        model = model.get_base_model()
    config = _maybe_include_all_linear_layers(
        LoraConfig(target_modules=target_modules, exclude_modules=exclude_modules), model
    )
    selected = []
    for name, module in model.named_modules():
        matched = check_target_module_exists(config, name) if name else None
        if not matched or type(matched).__name__ == "_ExcludedModule":
            continue
        base = base_layer_of(module)
        if not isinstance(base, SUPPORTED_TYPES):
            raise ValueError(
                f"layer '{name}' is {type(base).__name__}; spectrum reads {SUPPORTED_NAMES}: narrow target_modules"
            )
        if not base.weight.dtype.is_floating_point:
            raise ValueError(
                f"layer '{name}' holds a {base.weight.dtype} (quantised) weight: load the model in "
                "full precision to read its spectrum"
            )
        if base.weight.device.type == "meta":
            raise ValueError(
                f"layer '{name}' has its weight on the meta device (not loaded): load the weights "
                "before reading the spectrum"
            )
        if not all_finite(base.weight.detach()):
            raise ValueError(
                f"layer '{name}' has NaN or Inf in its weight: fix or reload the weights, or leave the "
                "layer out (exclude_modules)"
            )
        selected.append((name, base))
    if not selected:
        raise ValueError(
            f"target_modules={target_modules!r} matched no module; module names look like "
            f"{[n for n, _ in list(model.named_modules())[1:4]]}"
        )
    layers = {}
    with torch.no_grad():
        for name, base in tqdm(selected, desc="spectrum", disable=not show_progress or len(selected) < 8, leave=False):
            matrix = weight_matrix(base).float()
            values = singular_values(matrix).cpu()
            if not all_finite(values):  # a finite weight beyond fp32's range overflows in the fp32 decomposition
                raise ValueError(
                    f"layer '{name}': its singular values overflow fp32 (weight entries up to "
                    f"{float(base.weight.detach().abs().max()):.3g}): rescale the weight to read its "
                    "spectrum"
                )
            layers[name] = LayerSpectrum(name=name, shape=tuple(matrix.shape), singular_values=values)
    return Spectrum(layers)
