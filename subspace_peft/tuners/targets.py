"""Import path kept for users: target finding lives in ``tuners.base.targets``, weight shapes in
``tuners.base.geometry``."""

from .base.geometry import CONV_TYPES, SUPPORTED_NAMES, SUPPORTED_TYPES, weight_matrix
from .base.targets import Target, base_layer_of, check_rank, check_target, find_targets, pattern_value

__all__ = [
    "CONV_TYPES",
    "SUPPORTED_NAMES",
    "SUPPORTED_TYPES",
    "Target",
    "base_layer_of",
    "check_rank",
    "check_target",
    "find_targets",
    "pattern_value",
    "weight_matrix",
]
