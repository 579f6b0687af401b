from .cache import SVDCache, weight_fingerprint
from .svd import SVDSettings, energy_rank, subspace_error, truncated_svd, truncated_svd_batched, truncated_svds

__all__ = [
    "SVDCache",
    "SVDSettings",
    "energy_rank",
    "subspace_error",
    "truncated_svd",
    "truncated_svd_batched",
    "truncated_svds",
    "weight_fingerprint",
]
