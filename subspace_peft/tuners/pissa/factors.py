"""PiSSA's initial factors from a truncated SVD, shared by the tuner and QPiSSA's alternation (quant_iters.py)."""

from __future__ import annotations

import torch


def pissa_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, scaling: float):
    """PiSSA's initial factors (paper eq. 2-3): A = diag(sqrt(S/s)) V^T, B = U diag(sqrt(S/s)), so s B A = U S V^T."""
    root = torch.sqrt(s / scaling)
    return root[:, None] * vh, u * root[None, :]
