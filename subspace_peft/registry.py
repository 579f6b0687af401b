"""The one place where subspace-peft extends peft's registry, and the record that says everything about a method.

peft 0.21 keeps its method names in ``PeftType``, a closed ``str`` Enum, and ``register_peft_method`` refuses a
name that is not a member. A plugin therefore adds the member itself (stdlib only), then registers its config,
tuner and prefix. Everything here is idempotent: importing ``subspace_peft`` twice, or after peft already
imported transformers, registers each method exactly once.

This module imports no tuner: the records themselves (``subspace_peft.methods``) import the classes they name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

from peft.utils import peft_types
from peft.utils.peft_types import PeftType

from .checks import choice


@dataclass(frozen=True)
class Paper:
    title: str
    authors: str  # as cited: "Meng et al."
    year: int
    url: str

    def citation(self) -> str:
        return f'{self.authors}, "{self.title}", {self.year}, {self.url}'


@dataclass(frozen=True)
class Method:
    """One method, as peft, the model card, the recipes and the README know it.

    ``name`` is lower case ("pissa"): the ``PeftType`` member is its upper-case form and the prefix of its adapter
    weights ``<name>_``. ``card_fields`` are the config fields a model card lists (what sets the adapter's size), in
    the order a reader wants them. ``recipe_defaults`` is the ``method_config`` of ``recipes/configs/<name>.yaml``
    (less its SVD cache setting); the default method's is the recipe's default. ``recipe_learning_rate`` is that file's
    learning rate and the recipe's default for the method: the best rate of ``benchmarks/bench_quality.py``'s sweep
    for that config (``recipe_learning_rate_quantized`` with a 4/8-bit base). ``peft_builtin`` marks one of peft's
    own methods (LoRA): it has a record for the recipe and the card, and :func:`register` leaves it to peft.

    What the method needs from its surroundings, read by the recipes' quantisation and guards, offline init and the
    model card (no code outside a method's folder and its record tests its name):

    - ``quantized_base``: how it trains on a 4/8-bit base: ``"on_load"`` (bitsandbytes quantises the base as it
      loads: QLoRA) or ``"residual"`` (the residual is quantised after the SVD, from each whole weight: QPiSSA);
      None: it takes its SVD or its update from the full-precision weights.
    - ``frozen_buffers``: its layers keep frozen tensors as buffers (FSDP2 does not shard those).
    - ``ranks_from_weights``: the config field with which the weights choose each layer's rank (SVFit's energy);
      a layer's shape alone does not tell its rank then.
    """

    name: str
    config_cls: type
    model_cls: type
    display_name: str = ""
    card_fields: tuple[str, ...] = ("r",)
    paper: Optional[Paper] = None
    recipe_defaults: Mapping = field(default_factory=dict, hash=False)
    recipe_learning_rate: float = 2e-4
    recipe_learning_rate_quantized: Optional[float] = None
    peft_builtin: bool = False
    quantized_base: Optional[str] = None
    frozen_buffers: bool = False
    ranks_from_weights: Optional[str] = None

    def __post_init__(self):
        choice(f"Method {self.name!r}", "quantized_base", self.quantized_base, (None, "on_load", "residual"))

    @property
    def whole_weights_at_init(self) -> bool:
        """On a quantised base it needs every whole weight at init (a partitioned load cannot build it)."""
        return self.quantized_base == "residual"

    @property
    def peft_type(self) -> str:
        return self.name.upper()

    @property
    def prefix(self) -> str:
        return f"{self.name}_"

    @property
    def title(self) -> str:
        return self.display_name or self.name


_REGISTERED: dict[str, Method] = {}
_RECORDS: dict[str, Method] = {}  # every record passed to register, peft's own methods included, by peft type


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
        if prefix == method.prefix and str(peft_type) != method.peft_type:
            raise KeyError(f"prefix {method.prefix!r} of {method.name} is already used by peft type {peft_type}")


def register(method: Method) -> None:
    """Register one method with peft (a ``peft_builtin`` one is only recorded). Calling it again for the same
    method does nothing; a name peft already has for another config class is a KeyError."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if method.peft_builtin:
        _RECORDS[method.peft_type] = method
        return
    peft_type = add_peft_type_member(method.peft_type)
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is not method.config_cls:
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
    _RECORDS[method.peft_type] = method


def registered_methods() -> dict[str, Method]:
    """The methods registered with peft through :func:`register`, by name."""
    return dict(_REGISTERED)


def method_record(peft_type) -> Optional[Method]:
    """The record of a registered method (peft's own included) from its peft type or name; None if it has none."""
    return _RECORDS.get(str(getattr(peft_type, "value", peft_type)).upper())


def known_methods() -> tuple[Method, ...]:
    """Every record registered so far, peft's own methods included, in registration order."""
    return tuple(_RECORDS.values())
