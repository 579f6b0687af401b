"""Every private name of peft, huggingface_hub and bitsandbytes that subspace-peft uses (PRIVATE_APIS.md) still exists
with the parameters we call it with. An upgrade that moves one fails here first, naming it, before the behaviour
tests that depend on it fail in less obvious ways."""

from __future__ import annotations

import enum
import inspect

import pytest


def _parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_peft_type_members_are_added_through_enum_internals():
    from peft.utils.peft_types import PeftType

    assert issubclass(PeftType, str) and issubclass(PeftType, enum.Enum)
    for name in ("_member_map_", "_value2member_map_", "_member_names_"):
        assert hasattr(PeftType, name), f"enum.Enum.{name} (subspace_peft/registry.py)"


def test_peft_module_helpers():
    from peft.tuners import tuners_utils

    assert _parameters(tuners_utils._get_in_out_features) == ["module"]
    assert _parameters(tuners_utils._maybe_include_all_linear_layers) == ["peft_config", "model"]
    assert tuners_utils._ExcludedModule.__name__ == "_ExcludedModule"


def test_peft_base_tuner_methods_we_call_or_override():
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

    expected = {  # parameters after self / cls
        "_prepare_adapter_config": ["peft_config", "model_config"],
        "_check_target_module_exists": ["peft_config", "key"],
        "_unload_and_optionally_merge": ["merge", "progressbar", "safe_merge", "adapter_names"],
        "_replace_module": ["parent", "child_name", "new_module", "child"],
        "_create_and_replace": ["peft_config", "adapter_name", "target", "target_name", "parent", "current_key"],
        "_remap_adapter_state_dict_for_load": ["model", "config", "adapter_name", "state_dict"],
    }
    for name, parameters in expected.items():
        found = [p for p in _parameters(getattr(BaseTuner, name)) if p != "self"]
        assert found[: len(parameters)] == parameters, f"BaseTuner.{name}: {found}"
    # PeftModel enters the tuner's _enable_peft_forward_hooks (by that name) around forward and generate
    assert "base_model._enable_peft_forward_hooks" in inspect.getsource(PeftModel._enable_peft_forward_hooks)
    assert "_active_adapter" in inspect.getsource(BaseTunerLayer.active_adapter.fget)


def test_peft_model_base_class_lookup():
    from peft import PeftModel

    assert _parameters(PeftModel._get_base_model_class) == ["self", "is_prompt_tuning"]


def test_huggingface_hub_client_factory():
    import huggingface_hub
    from huggingface_hub.utils import _http

    if not hasattr(huggingface_hub, "set_client_factory"):
        pytest.skip("huggingface_hub < 1.0: push_adapter warns and does not bound waits")
    assert callable(_http.default_client_factory)
    assert "_GLOBAL_CLIENT_FACTORY" in vars(_http)


def test_bitsandbytes_cpu_repacking_switch():
    import bitsandbytes as bnb

    assert "support_avx512bf16_for_cpu" in inspect.getsource(bnb.nn.Linear4bit)
