from __future__ import annotations

import math
import re

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...checks import choice, integer, number
from ...linalg.svd import truncated_svd
from ..base import InitCall, LayerPlan, SVDTuner, Target, pattern_value
from .bnb import require_bitsandbytes
from .config import PiSSAConfig
from .factors import pissa_factors
from .layer import PiSSALayer
from .quant_iters import alternating_factors


class PiSSAModel(SVDTuner):
    """Creates a PiSSA model from a pretrained transformers model (or any torch model with supported layers).

    Before any module is replaced, every target is checked (layer type, dtype, finite weights, rank) and all SVDs are
    computed in one pass (batched where that is faster, read from the on-disk cache when enabled, with a progress bar).
    A failing check raises a ValueError and leaves the model exactly as it was.
    """

    prefix: str = "pissa_"
    method_name = "PiSSA"
    tuner_layer_cls = PiSSALayer

    def _rank(self, target: Target, config: PiSSAConfig) -> int:
        return pattern_value(config.rank_pattern, target.key, config.r)

    def _plan_layer(self, target: Target, config: PiSSAConfig) -> LayerPlan:
        r = self._rank(target, config)
        alpha = pattern_value(config.alpha_pattern, target.key, config.lora_alpha)
        return LayerPlan(target, r, scale=alpha / r, dropout=config.lora_dropout)

    def _check_plan(self, model: nn.Module, config: PiSSAConfig, plan: dict) -> None:
        if config.residual_quantization and self.injected_without_peft_model:
            raise ValueError(
                "QPiSSA adapters load through peft only: transformers' model.load_adapter()/add_adapter() and "
                "peft.inject_adapter_in_model() skip the step that quantises the residual from the adapter's loaded "
                "factors, so the model would not be the one saved. Use PeftModel.from_pretrained(base, path) (or "
                "get_peft_model for a new adapter)"
            )
        if config.residual_quantization:
            self._check_qpissa(model, plan)
        elif any(isinstance(m, PiSSALayer) and any(m.residual_in_base.values()) for m in model.modules()):
            raise ValueError(
                "this model's base layers hold a QPiSSA residual of another adapter; a second PiSSA adapter on it "
                "would be initialised from that residual. Build a new QPiSSA model from the full-precision base."
            )

    @staticmethod
    def _check_qpissa(model: nn.Module, plan: dict) -> None:
        require_bitsandbytes()
        if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            raise ValueError(
                "QPiSSA (residual_quantization) replaces the base weights by one adapter's quantised residual, so it "
                "must be the model's first and only adapter: start from the full-precision base model"
            )
        for key, layer_plan in plan.items():
            if type(layer_plan.target.base) is not nn.Linear:
                raise ValueError(
                    f"QPiSSA quantises nn.Linear residuals only, but layer '{key}' is "
                    f"{type(layer_plan.target.base).__name__}: restrict target_modules to linear layers or set "
                    "residual_quantization=None"
                )

    def _needs_whole_weights(self, config: PiSSAConfig):
        if config.residual_quantization:
            return (
                "QPiSSA (residual_quantization) replaces each base weight by its quantised residual and needs every "
                "whole weight on every rank. Fix: load the base unpartitioned (DeepSpeed zero3_init_flag: false; "
                "FSDP2 fsdp_cpu_ram_efficient_loading: false, fully_shard after get_peft_model)"
            )
        return None

    def _factors_from_svd(self, u, s, vh, plan: LayerPlan):
        return pissa_factors(u, s, vh, scaling=plan.scale)

    def _initial_factors(self, plans: dict, config: PiSSAConfig, call: InitCall) -> dict:
        factors = super()._initial_factors(plans, config, call)
        if config.residual_quantization and config.residual_quant_iters > 1:
            from tqdm.auto import tqdm

            # QPiSSA with LoftQ-style alternation (quant_iters.py): the iterations only choose the factors
            settings = config.svd_settings()
            # (every rank of a split init runs this on every layer from the same broadcast factors: no collective)
            keys = list(factors)
            for key in tqdm(keys, desc="QPiSSA iterations", disable=len(keys) < 8, leave=False):
                plan = plans[key]
                factors[key] = alternating_factors(
                    plan.target.base,
                    factors[key],
                    plan.scale,
                    config.residual_quantization,
                    config.residual_quant_iters,
                    settings,
                    config.residual_quant_storage,
                )
        return factors

    def _finish_layer(self, layer: PiSSALayer, adapter_name: str, config: PiSSAConfig) -> None:
        if config.residual_quantization:
            layer.quantize_residual_into_base(adapter_name, config.residual_quantization, config.residual_quant_storage)

    # -- peft's add_weighted_adapter ----------------------------------------------------------------------------------
    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
    ) -> None:
        """Add ``adapter_name``, the weighted sum ``sum_i w_i * delta_i`` of PiSSA adapters, as peft's LoRA does.

        ``"cat"`` is exact (rank: the sum of the ranks): ``A = [w_i s_i A_i]``, ``B = [B_i]`` and the same for the
        initial factors, so ``B A - B_0 A_0`` is the weighted sum. ``"svd"`` is the best rank-``svd_rank`` (default:
        the largest rank combined) approximation of the summed update, as a plain ``B A`` with zero initial factors.
        ``"linear"`` (equal ranks, weights >= 0) sums ``sqrt(w_i s_i)``-scaled factors, peft's rough approximation.
        The new adapter is not active; reload needs no SVD like any other.
        """
        self._check_weighted_adapters(adapters, weights, adapter_name, combination_type, svd_rank)
        layers = [
            (key, layer)
            for key, layer in self.model.named_modules()
            if isinstance(layer, PiSSALayer) and any(name in layer.r for name in adapters)
        ]
        combined = {
            key: _combined_factors(key, layer, adapters, weights, combination_type, svd_rank) for key, layer in layers
        }
        ranks = {key: factors[0].shape[0] for key, factors in combined.items()}
        pattern = {re.escape(key): rank for key, rank in ranks.items()}  # exact module names; scale s = 1 everywhere
        values = self.peft_config[adapters[0]].to_dict()
        values.update(
            r=next(iter(ranks.values())),
            lora_alpha=next(iter(ranks.values())),
            rank_pattern=pattern,
            alpha_pattern=dict(pattern),
            target_modules=sorted(ranks),
            exclude_modules=None,
            layers_to_transform=None,
            layers_pattern=None,
            modules_to_save=None,
            residual_quantization=None,
            residual_quant_storage=None,
            residual_quant_iters=1,
        )

        def fill(key, layer):
            a, b, a0, b0 = combined[key]
            for (a_module, b_module), (a_matrix, b_matrix) in (
                ((layer.pissa_A, layer.pissa_B), (a, b)),
                ((layer.pissa_A0, layer.pissa_B0), (a0, b0)),
            ):
                a_weight, b_weight = layer.geometry.factor_weights(a_matrix, b_matrix)
                a_module[adapter_name].weight.copy_(a_weight)
                b_module[adapter_name].weight.copy_(b_weight)

        self._add_filled_adapter(adapter_name, PiSSAConfig(**values), fill)

    def _check_weighted_adapters(self, adapters, weights, adapter_name, combination_type, svd_rank) -> None:
        where = "add_weighted_adapter"
        choice(where, "combination_type", combination_type, ("cat", "linear", "svd"))
        if not adapters or len(adapters) != len(weights):
            raise ValueError(
                f"{where}: give one weight per adapter, got {len(adapters)} adapters and {len(weights)} weights"
            )
        missing = [name for name in adapters if name not in self.peft_config]
        if missing:
            raise ValueError(f"{where}: this model has no adapter(s) {missing}; it has {sorted(self.peft_config)}")
        for name, weight in zip(adapters, weights):
            low = 0 if combination_type == "linear" else None
            number(
                where,
                f"weight of {name!r}",
                weight,
                "linear needs weights >= 0 (cat and svd take any)" if low is not None else "weights are finite numbers",
                low=low,
            )
            if self.peft_config[name].residual_quantization:
                raise ValueError(
                    f"{where}: adapter {name!r} is QPiSSA, whose base holds its own residual: a "
                    "combination with it has no base to run on. Combine full-precision PiSSA adapters."
                )
        if svd_rank is not None:
            integer(where, "svd_rank", svd_rank, "pass the rank of the combined adapter, e.g. svd_rank=16", low=1)
        if adapter_name in self.peft_config:
            raise ValueError(f"{where}: adapter {adapter_name!r} already exists: choose a new name")


def _combined_factors(key: str, layer: PiSSALayer, adapters, weights, combination_type: str, svd_rank):
    """(A, B, A_0, B_0) matrices at scale 1 whose ``B A - B_0 A_0`` combines ``adapters`` on ``layer``."""
    terms = [(name, weight, layer.scaling[name]) for name, weight in zip(adapters, weights) if name in layer.r]
    current = {name: layer._matrices(name, initial=False) for name, _, _ in terms}
    initial = {name: layer._matrices(name, initial=True) for name, _, _ in terms}
    if combination_type == "cat":
        rank, (a, b) = sum(layer.r[n] for n, _, _ in terms), current[terms[0][0]]
        if rank > min(b.shape[0], a.shape[1]):
            raise ValueError(
                f"add_weighted_adapter: 'cat' would give layer '{key}' rank {rank}, more than min(d_out, "
                f"d_in) = {min(b.shape[0], a.shape[1])}: use combination_type='svd' (with svd_rank <= "
                f"{min(b.shape[0], a.shape[1])}), or leave that layer out of the adapters' targets"
            )
        return (
            torch.cat([w * s * current[n][0] for n, w, s in terms]),
            torch.cat([current[n][1] for n, _, _ in terms], dim=1),
            torch.cat([w * s * initial[n][0] for n, w, s in terms]),
            torch.cat([initial[n][1] for n, _, _ in terms], dim=1),
        )
    if combination_type == "linear":
        if len({layer.r[n] for n, _, _ in terms}) > 1:
            raise ValueError(
                f"add_weighted_adapter: 'linear' needs equal ranks, but layer '{key}' has ranks "
                f"{ {n: layer.r[n] for n, _, _ in terms} }: use combination_type='cat' or 'svd'"
            )
        root = {n: math.sqrt(w * s) for n, w, s in terms}
        return tuple(
            sum(root[n] * factors[n][i] for n, _, _ in terms)
            for factors, i in ((current, 0), (current, 1), (initial, 0), (initial, 1))
        )
    delta = sum(w * s * (current[n][1] @ current[n][0] - initial[n][1] @ initial[n][0]) for n, w, s in terms)
    rank = svd_rank or max(layer.r[n] for n, _, _ in terms)
    if rank > min(delta.shape):
        raise ValueError(
            f"add_weighted_adapter: svd_rank={rank} exceeds min(d_out, d_in) = {min(delta.shape)} of "
            f"layer '{key}': choose svd_rank <= {min(delta.shape)}"
        )
    u, singular, vh = truncated_svd(delta, rank)
    root = singular.sqrt()
    a, b = root[:, None] * vh, u * root[None, :]
    return a, b, torch.zeros_like(a), torch.zeros_like(b)
