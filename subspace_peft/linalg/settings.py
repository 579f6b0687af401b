"""How a truncated SVD is computed: the settings every decomposition in ``linalg`` and its cache are keyed by."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SVDMethod = Literal["exact", "randomized"]
SVDComponents = Literal["principal", "minor"]


@dataclass(frozen=True)
class SVDSettings:
    """How a truncated SVD is computed.

    ``method="exact"`` runs a full LAPACK SVD and keeps the top ``rank`` triplets. ``method="randomized"`` runs the
    Halko-Martinsson-Tropp range finder (Algorithm 4.4 in arXiv:0909.4061) with ``oversample`` extra columns and
    ``niter`` power iterations, from a Gaussian test matrix drawn from a generator seeded with ``seed``: the same
    settings give the same factors whatever the global RNG state.

    ``components="principal"`` keeps the ``rank`` largest singular triplets, ``"minor"`` the ``rank`` smallest of
    the ``min(m, n)`` (Effort trains those). Minor components need the exact method: a range finder only sees the
    dominant subspace.
    """

    method: SVDMethod = "exact"
    niter: int = 2
    oversample: int = 16
    seed: int = 0
    components: SVDComponents = "principal"

    def __post_init__(self):
        if self.method not in ("exact", "randomized"):
            raise ValueError(f"SVD method must be 'exact' or 'randomized', got {self.method!r}")
        if self.components not in ("principal", "minor"):
            raise ValueError(f"SVD components must be 'principal' or 'minor', got {self.components!r}")
        if self.components == "minor" and self.method != "exact":
            raise ValueError(
                "the minor singular components need an exact SVD (a randomized SVD only finds the dominant "
                "subspace): use init='svd'"
            )
        if self.niter < 0:
            raise ValueError(f"niter must be >= 0, got {self.niter}")
        if self.oversample < 0:
            raise ValueError(f"oversample must be >= 0, got {self.oversample}")

    def key(self) -> str:
        if self.components == "minor":
            return "exact-minor"
        if self.method == "exact":
            return "exact"
        return f"randomized-niter{self.niter}-p{self.oversample}-seed{self.seed}"
