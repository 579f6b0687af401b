"""The methods of subspace-peft, one folder each, on the family base in ``base/``."""

from . import targets  # noqa: F401  (import path kept: subspace_peft.tuners.targets.weight_matrix)
