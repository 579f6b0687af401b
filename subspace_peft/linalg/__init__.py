from .cache import SVDCache, weight_fingerprint
from .settings import SVDSettings
from .svd import energy_rank, singular_values, subspace_error, truncated_svd, truncated_svd_batched, truncated_svds

__all__ = [
    "SVDCache",
    "SVDSettings",
    "energy_rank",
    "singular_values",
    "subspace_error",
    "truncated_svd",
    "truncated_svd_batched",
    "truncated_svds",
    "weight_fingerprint",
]
