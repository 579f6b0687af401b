"""The one place where subspace-peft extends peft's registry.

peft 0.21 keeps its method names in ``PeftType``, a closed ``str`` Enum, and ``register_peft_method`` refuses a
name that is not a member. A plugin therefore adds the member itself (stdlib only), then registers its config,
tuner and prefix. Everything here is idempotent: importing ``subspace_peft`` twice, or after peft already
imported transformers, registers each method exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

from peft.utils import peft_types
from peft.utils.peft_types import PeftType


@dataclass(frozen=True)
class Method:
    name: str  # lower case, e.g. "pissa"; the PeftType member is its upper-case form
    config_cls: type
    model_cls: type

    @property
    def prefix(self) -> str:
        return f"{self.name}_"


_REGISTERED: dict[str, Method] = {}


def add_peft_type_member(name: str) -> PeftType:
    """Add ``name`` (upper case) to ``PeftType`` so that ``PeftType(name)`` and ``PeftType[name]`` both work.

    Name equals value: peft looks configs up with the raw string from adapter_config.json, and transformers calls
    ``peft_type.value.lower()``.
    """
    if name != name.upper():
        raise ValueError(f"PeftType members are upper case, got {name!r}")
    existing = PeftType.__members__.get(name)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    # Enum blocks setattr on the class for member names; type.__setattr__ goes around that guard.
    type.__setattr__(PeftType, name, member)
    return member


def _check_prefix_is_free(method: Method) -> None:
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    # peft's own check compares the prefix against the mapping's keys (peft types), not its values (prefixes).
    for peft_type, prefix in PEFT_TYPE_TO_PREFIX_MAPPING.items():
        if prefix == method.prefix and str(peft_type) != method.name.upper():
            raise KeyError(f"prefix {method.prefix!r} of {method.name} is already used by peft type {peft_type}")


def register(method: Method) -> None:
    """Register one method with peft. Calling it again for the same method does nothing."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    peft_type = add_peft_type_member(method.name.upper())
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is method.config_cls:
        _REGISTERED[method.name] = method
        return
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise KeyError(
            f"peft already has a method called {method.name!r} from another package; "
            "uninstall it or import subspace_peft in a fresh process"
        )
    _check_prefix_is_free(method)
    peft_types.register_peft_method(
        name=method.name, config_cls=method.config_cls, model_cls=method.model_cls, prefix=method.prefix
    )
    _REGISTERED[method.name] = method


def registered_methods() -> dict[str, Method]:
    return dict(_REGISTERED)
