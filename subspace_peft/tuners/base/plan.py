"""The plan of one adapted layer: everything its tuner layer is built from, decided by the model before any module of
the user's model is replaced."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .targets import Target


@dataclass
class LayerPlan:
    """What adapter ``r`` a layer gets and what it starts from.

    Args:
        target: the module and its innermost base layer.
        r: the method's rank: an int, or FLoRA's per-mode ranks (weight order).
        scale: the factor the update is multiplied by (PiSSA's ``lora_alpha / r``, FLoRA's ``scale``; 1 otherwise).
        dropout: dropout on the adapter's input (0: none).
        factors: the initial tensors (the method's SVD factors, FLoRA's core and mode factors), or None: the layer
            is built empty, for a checkpoint to fill in.
    """

    target: Target
    r: Any
    scale: float = 1.0
    dropout: float = 0.0
    factors: Optional[tuple] = None

    @property
    def key(self) -> str:
        return self.target.key


@dataclass(frozen=True)
class InitCall:
    """How one initialisation runs, passed down with the plans it initialises.

    Args:
        checks_finite: the init checks the weights it computes from for NaN/Inf itself (planning skipped that check:
            a weight the SVD cache answers for was finite when its entry was written).
        collective: every rank of a torch.distributed job takes part (False: one layer on one rank, initialised
            afresh after a load dropped its mismatched tensors).
    """

    checks_finite: bool = False
    collective: bool = True
