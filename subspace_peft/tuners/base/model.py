"""The model side all our tuners share: plan and check every target, prepare every layer's initial tensors, then
inject; or, for a saved adapter, build empty layers and fill them from its checkpoint.

A subclass says how a layer is planned (``_rank``, or ``_plan_layer`` for a scale or dropout: one
:class:`LayerPlan` per layer), checked (``_check_rank``, ``_check_plan``), which initial tensors it starts from
(``_initial_factors``: SVD factors for :class:`SVDTuner`, FLoRA's own init otherwise) and what completes a layer
once its tensors hold values (``_finish_layer``, e.g. QPiSSA's quantised residual). The plan is the one thing
passed down to the method's layer class (``tuner_layer_cls(target, adapter_name, plan)``). Everything that can fail
runs before the first module is replaced, so a ValueError leaves the user's model exactly as it was.

Loading a saved adapter (``PeftModel.from_pretrained``, ``load_adapter``, ``AutoPeftModelFor*``) never initialises:
the config read by ``from_pretrained`` is marked (see ``config``), its layers are planned without factors and built
empty, and the checkpoint is checked as a whole before a single tensor is copied: every tensor the layers need must
be in the file with the layer's shape (``ignore_mismatched_sizes=True`` drops the mismatched ones, and only those
layers are initialised afresh, as peft does for LoRA).
"""

from __future__ import annotations

import warnings
from abc import abstractmethod
from contextlib import contextmanager
from functools import partial
from typing import Any, Optional

import torch
from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from ...linalg.cache import SVDCache
from .config import expect_checkpoint, is_saved_adapter_config, mark_checkpoint_loaded
from .distributed import initial_svds, opted_out, world_size
from .layer import FactorLayer
from .plan import InitCall, LayerPlan
from .targets import Target, check_finite, check_rank, check_target, find_targets


class PlannedTuner(BaseTuner):
    method_name: str  # as users write it, for error messages
    supports_grouped_conv = False
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def __init__(self, model: nn.Module, peft_config, *args: Any, **kwargs: Any) -> None:
        # PeftModel passes {name: config}; peft's inject_adapter_in_model (what transformers' load_adapter and
        # add_adapter call) passes the config alone and then keeps only the model: no load hook of ours runs after it
        self.injected_without_peft_model = isinstance(peft_config, PeftConfig)
        super().__init__(model, peft_config, *args, **kwargs)
        self.register_load_state_dict_pre_hook(_check_checkpoint_before_load)
        self.register_load_state_dict_post_hook(_complete_layers_after_load)

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict=None,
    ) -> None:
        config = self.peft_config[adapter_name]
        initialise = not (low_cpu_mem_usage or is_saved_adapter_config(config))
        # a weight the SVD cache answers for was finite when its entry was written: its NaN/Inf check waits for the
        # init, which runs it on the weights the cache does not answer (a cache hit costs 1.1x a LoRA init, not 1.4x)
        call = InitCall(checks_finite=initialise and self._checks_finite_at_init(config))
        plans = self._plan(model, config, check_finite=not call.checks_finite)
        if initialise:
            self._add_initial_factors(plans, config, call)
        # the config saved with the adapter holds what the plan chose; the user's config object is never written to
        self.peft_config[adapter_name] = self._recorded_config(config, plans)
        # peft's inject_adapter calls _create_and_replace once per module with no room for our arguments: each
        # layer's plan waits here, for that one call (the one place a call's state lives on the tuner; see
        # PRIVATE_APIS.md, "State between calls")
        self._plans_to_inject = plans
        try:
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
        except BaseException:
            self.peft_config[adapter_name] = config
            raise
        finally:
            del self._plans_to_inject

    @abstractmethod
    def _rank(self, target: Target, config) -> Any:
        """The rank this method gives ``target`` under ``config``."""

    def _plan_layer(self, target: Target, config) -> LayerPlan:
        """The plan of ``target``'s layer under ``config``, without its initial tensors."""
        return LayerPlan(target, self._rank(target, config))

    def _check_rank(self, plan: LayerPlan) -> None:
        """Raise a ValueError naming the layer if ``plan.r`` does not fit it."""

    def _check_plan(self, model: nn.Module, config, plans: dict[str, LayerPlan]) -> None:
        """Method-specific checks of the whole plan (raise ValueError)."""

    @abstractmethod
    def _initial_factors(self, plans: dict[str, LayerPlan], config, call: InitCall) -> dict:
        """Per planned layer, the initial tensors its layer starts from (``LayerPlan.factors``)."""

    def _finish_layer(self, layer: FactorLayer, adapter_name: str, config) -> None:
        """Complete ``layer`` once ``adapter_name``'s tensors hold their values (after init, or after loading)."""

    def _plan(self, model: nn.Module, config, check_finite: bool = True) -> dict[str, LayerPlan]:
        """Every target's plan, checked; ``check_finite``: NaN/Inf in a target's weight is refused here (else the
        init checks it, :class:`InitCall`)."""
        targets = find_targets(self, model, config)
        for target in targets:
            check_target(target, self.method_name, grouped_ok=self.supports_grouped_conv, finite=check_finite)
        plans = self._plan_layers(targets, config)
        for plan in plans.values():
            self._check_rank(plan)
        self._check_plan(model, config, plans)
        return plans

    def _plan_layers(self, targets: list[Target], config) -> dict[str, LayerPlan]:
        """Every target's plan; a method whose ranks depend on all the targets at once (SVFit's energy) overrides it."""
        return {target.key: self._plan_layer(target, config) for target in targets}

    def _recorded_config(self, config, plans: dict[str, LayerPlan]):
        """The config kept and saved with the adapter: ``config``, or a copy holding what the plans chose from the
        weights (SVFit's energy ranks), so that reloading needs no SVD."""
        return config

    def _checks_finite_at_init(self, config) -> bool:
        """Whether ``_initial_factors`` checks the weights it computes from for NaN/Inf itself (else ``_plan`` checks
        every target)."""
        return False

    def _add_initial_factors(self, plans: dict[str, LayerPlan], config, call: InitCall) -> None:
        for key, factors in self._initial_factors(plans, config, call).items():
            plans[key].factors = factors

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        tuner = next((module for module in model.modules() if isinstance(module, PlannedTuner)), None)
        if tuner is None:  # layers injected without a tuner module (inject_adapter_in_model): nothing to check against
            return remapped
        missing = tuner._tensors_missing_from(remapped, adapter_name, prefix=_prefix_of(model, tuner))
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            tuner._refuse_load(
                {adapter_name},
                f"this {cls.method_name} checkpoint lacks '{missing[0]}'{more}, which adapter '{adapter_name}' needs: "
                "the file is incomplete or holds another method's adapter (check peft_type in adapter_config.json "
                "against the tensor names in adapter_model.safetensors, or save the adapter again)",
            )
        return remapped

    def _tensors_missing_from(self, state_dict: dict, adapter_name: str, prefix: str) -> list[str]:
        """Keys of ``adapter_name``'s tensors that ``state_dict`` lacks (a file of another method, or a truncated or
        edited one): peft would only warn and leave them uninitialised."""
        return [full for full, *_ in _adapter_state_keys(self, prefix, adapter_name) if full not in state_dict]

    def _refuse_load(self, adapters: set[str], message: str) -> None:
        """Raise ``message`` as a ValueError after removing the empty layers built for ``adapters`` (those still
        waiting for this checkpoint), so the user's base model is exactly as it was before the load began."""
        for adapter in adapters:
            if any(adapter in layer.awaiting_checkpoint for _, layer in _layers(self)):
                if len(self.peft_config) > 1:
                    self.delete_adapter(adapter)
                else:
                    self._unload_and_optionally_merge(merge=False)
        raise ValueError(message)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        plan = self._plans_to_inject.pop(current_key)
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, plan)
            layer = target
        else:
            layer = self.tuner_layer_cls(target, adapter_name, plan)
        if plan.factors is None:
            layer.awaiting_checkpoint.add(adapter_name)
            if self.injected_without_peft_model:
                layer.finish_after_outside_load[adapter_name] = partial(self._finish_layer, layer, adapter_name, config)
        else:
            self._finish_layer(layer, adapter_name, config)
        if layer is not target:
            if adapter_name not in self.active_adapters:
                layer.requires_grad_(False)
            self._replace_module(parent, target_name, layer, layer.get_base_layer())

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str, *args, **kwargs):
        """peft's LoRA API for combining adapters; only PiSSA's LoRA-shaped update supports it."""
        raise ValueError(
            f"add_weighted_adapter combines LoRA-shaped adapters; {self.method_name}'s update is not one. Combine "
            f"{self.method_name} adapters with subspace_peft.merging instead: adapter_task_vector(model, name) for "
            "each, then task_arithmetic / ties_merging / dare_merging / concrete_merge on the base model"
        )

    def _add_filled_adapter(self, adapter_name: str, config, fill) -> None:
        """Add ``adapter_name`` under ``config`` with empty layers (no init) and let ``fill(key, layer)`` set every
        layer's tensors."""
        expect_checkpoint(config)
        self.peft_config[adapter_name] = config
        try:
            self.inject_adapter(self.model, adapter_name)
        except Exception:
            del self.peft_config[adapter_name]
            raise
        with torch.no_grad():
            for key, layer in _layers(self):
                if adapter_name in layer.awaiting_checkpoint:
                    fill(key, layer)
                    layer.awaiting_checkpoint.discard(adapter_name)
        mark_checkpoint_loaded(config)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """peft's mixed-adapter batches (``model(..., adapter_names=[...])``, also in ``generate``): every adapted
        layer and ``modules_to_save`` wrapper gets the per-row adapter names for the duration of the call."""
        adapter_names = kwargs.pop("adapter_names", None)
        if kwargs.get("alora_offsets") is not None:
            raise ValueError(
                f"alora_offsets is an option of peft's activated LoRA; {self.method_name} has no "
                "activated form: drop alora_offsets"
            )
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("cannot pass adapter_names in training mode: call model.eval() first")
        known = set().union(*(layer.r.keys() for _, layer in _layers(self)))
        unknown = sorted({name for name in adapter_names if name != "__base__"} - known)
        if unknown:
            raise ValueError(
                f"adapter_names names adapter(s) this model does not have: {', '.join(unknown)} "
                f"(it has {', '.join(sorted(known))}, and '__base__' for the base model)"
            )
        beams = kwargs.get("num_beams")
        per_row = list(adapter_names)
        if isinstance(beams, int) and beams > 1:  # generate repeats each decoder row num_beams times
            per_row = [name for name in adapter_names for _ in range(beams)]
        handles = _hook_adapter_names(self.model, per_row)
        encoder = self.model.get_encoder() if hasattr(self.model, "get_encoder") else None
        if per_row != list(adapter_names) and encoder is not None and encoder is not self.model:
            handles += _hook_adapter_names(encoder, list(adapter_names))  # the encoder sees the rows once
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _initialise_afresh(self, key: str, layer: FactorLayer, adapter_name: str) -> None:
        """Initialise one layer's adapter as a new one would be (its checkpoint tensors were dropped as mismatched)."""
        config = self.peft_config[adapter_name]
        plans = {key: self._plan_layer(Target(key, layer.get_base_layer()), config)}
        self._add_initial_factors(plans, config, InitCall(collective=False))  # this rank alone: no collective
        trainable = {name: p.requires_grad for name, p in layer.named_parameters() if f".{adapter_name}." in name}
        layer.update_layer(adapter_name, plans[key])
        for name, parameter in layer.named_parameters():
            if name in trainable:
                parameter.requires_grad_(trainable[name])
        self._finish_layer(layer, adapter_name, config)


def svd_cache_for(config) -> SVDCache | None:
    if not config.svd_cache:
        return None
    return SVDCache(None if config.svd_cache is True else config.svd_cache)


class SVDTuner(PlannedTuner):
    """The SVD-initialised tuners (PiSSA, SVFit, Effort): every target's SVD is taken (or read from the cache) in one
    pass before the first module is replaced; a subclass says which initial tensors a layer takes from its singular
    triplets (``_factors_from_svd``)."""

    def _check_rank(self, plan: LayerPlan) -> None:
        check_rank(plan.target, plan.r, self.method_name)

    def _factors_from_svd(self, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, plan: LayerPlan):
        """The layer's initial tensors from its singular triplets; by default ``(Vh, U, S)``."""
        return vh, u, s

    def _needs_whole_weights(self, config) -> Optional[str]:
        """Why this init cannot run on partitioned or sharded base weights (e.g. QPiSSA), or None."""
        return None

    def _checks_finite_at_init(self, config) -> bool:
        return bool(config.svd_cache) and (world_size() == 1 or opted_out())

    def _initial_factors(self, plans: dict[str, LayerPlan], config, call: InitCall) -> dict:
        # split across the ranks of a torch.distributed job when one runs (see distributed.py)
        svds = initial_svds(
            {key: plan.target.base for key, plan in plans.items()},
            {key: plan.r for key, plan in plans.items()},
            config.svd_settings(),
            svd_cache_for(config),
            desc=f"{self.method_name} init",
            method=self.method_name,
            whole_only=self._needs_whole_weights(config),
            collective=call.collective,
            before_compute=check_finite if call.checks_finite else None,
        )
        return {key: self._factors_from_svd(*svds.pop(key), plans[key]) for key in list(svds)}


def _pass_adapter_names(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _hook_adapter_names(model: nn.Module, adapter_names: list) -> list:
    hook = partial(_pass_adapter_names, adapter_names=adapter_names)
    return [
        module.register_forward_pre_hook(hook, with_kwargs=True)
        for module in model.modules()
        if isinstance(module, (FactorLayer, AuxiliaryTrainingWrapper))
    ]


def _layers(tuner: PlannedTuner):
    return [(key, module) for key, module in tuner.model.named_modules() if isinstance(module, FactorLayer)]


def _adapter_state_keys(tuner: PlannedTuner, prefix: str, adapter: str | None = None):
    """(state-dict key under ``prefix``, layer name, layer, adapter, tensor) of every adapter tensor (of ``adapter``,
    or all) the tuner's layers keep."""
    for key, layer in _layers(tuner):
        for rel, name, tensor in layer.adapter_tensors(adapter):
            yield f"{prefix}model.{key}.{rel}", key, layer, name, tensor


def _prefix_of(model: nn.Module, tuner: PlannedTuner) -> str:
    """State-dict prefix of ``tuner`` inside ``model`` ('base_model.' in a PeftModel)."""
    name = next(name for name, module in model.named_modules() if module is tuner)
    return f"{name}." if name else ""


def _check_checkpoint_before_load(tuner, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook on the tuner: runs before any tensor below it is copied. A tensor of the wrong shape
    is a ValueError naming it (peft has already dropped them under ``ignore_mismatched_sizes=True``); empty layers whose
    adapter this checkpoint holds are listed for the post-hook, as loaded or dropped."""
    found = [
        (key, layer, adapter, tensor, state_dict.get(full), full)
        for full, key, layer, adapter, tensor in _adapter_state_keys(tuner, prefix)
    ]
    loading = {adapter for _, _, adapter, _, value, _ in found if value is not None}
    for key, _, _, tensor, value, full in found:
        if value is not None and tuple(value.shape) != tuple(tensor.shape):
            tuner._refuse_load(
                loading,
                f"the checkpoint's '{full}' has shape {tuple(value.shape)} but layer '{key}' of this model needs "
                f"{tuple(tensor.shape)}: load the adapter onto the base model it was trained on (see "
                "base_model_name_or_path in adapter_config.json), or pass ignore_mismatched_sizes=True to initialise "
                "the layers that differ afresh",
            )
    layers, complete = {}, {}
    for key, layer, adapter, _, value, _ in found:
        if adapter in loading and adapter in layer.awaiting_checkpoint:
            layers[(key, adapter)] = layer
            complete[(key, adapter)] = complete.get((key, adapter), True) and value is not None
    tuner._checkpoint_load = {"layers": layers, "complete": complete}


def _complete_layers_after_load(tuner, incompatible_keys) -> None:
    """load_state_dict post-hook on the tuner: layers whose tensors were loaded are finished (e.g. QPiSSA quantises
    its residual); layers whose tensors were dropped as mismatched are initialised afresh, with a warning."""
    load = tuner.__dict__.pop("_checkpoint_load", None)
    if not load:
        return
    dropped = []
    for (key, adapter), layer in load["layers"].items():
        if load["complete"][(key, adapter)]:
            tuner._finish_layer(layer, adapter, tuner.peft_config[adapter])
        else:
            tuner._initialise_afresh(key, layer, adapter)
            dropped.append(key)
        layer.awaiting_checkpoint.discard(adapter)
    if dropped:
        warnings.warn(
            f"{tuner.method_name}: the checkpoint's tensors for {sorted(set(dropped))} did not fit this model and were "
            "ignored (ignore_mismatched_sizes=True); those layers start from a fresh initialisation"
        )
    for adapter in {adapter for _, adapter in load["layers"]}:
        if not any(adapter in layer.awaiting_checkpoint for _, layer in _layers(tuner)):
            mark_checkpoint_loaded(tuner.peft_config[adapter])
