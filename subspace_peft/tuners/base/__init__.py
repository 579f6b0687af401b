"""The family base of the tuners: config fields, the model side (plan, init, inject, load), one layer class per
method over a per-layer-type geometry, and the leaf modules adapter tensors live in."""

from .config import SVDInitConfig, TargetConfig
from .geometry import CONV_TYPES, full_shape, geometry_for, matrix_shape, weight_matrix
from .layer import FactorLayer
from .leaf import SingularValues, TensorLeaf
from .model import PlannedTuner, SVDTuner
from .plan import InitCall, LayerPlan
from .targets import Target, pattern_value

__all__ = [
    "CONV_TYPES",
    "FactorLayer",
    "InitCall",
    "LayerPlan",
    "PlannedTuner",
    "SVDInitConfig",
    "SVDTuner",
    "SingularValues",
    "Target",
    "TargetConfig",
    "TensorLeaf",
    "full_shape",
    "geometry_for",
    "matrix_shape",
    "pattern_value",
    "weight_matrix",
]
