"""Tucker products of N-d tensors (pure torch): ``G x_1 A_1 x_2 A_2 ... x_N A_N``."""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def mode_product(tensor: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """``tensor x_mode matrix``: multiply every mode-``mode`` fibre of ``tensor`` by ``matrix`` (new, old).

    A plain matmul on the mode-``mode`` unfolding (so autocast treats it like any matmul)."""
    moved = tensor.movedim(mode, 0)
    product = matrix @ moved.reshape(moved.shape[0], -1)
    return product.reshape(matrix.shape[0], *moved.shape[1:]).movedim(0, mode)


def tucker_to_tensor(core: torch.Tensor, factors: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """The full tensor ``core x_1 factors[0] x_2 factors[1] ...``; ``factors[m]`` is (size_m, rank_m).

    A ``None`` factor leaves that mode at its rank (a partial Tucker product). Modes are multiplied smallest
    ``size / rank`` growth first, which keeps the intermediate tensors small; the result does not depend on the order.
    """
    order = sorted(
        (m for m, f in enumerate(factors) if f is not None), key=lambda m: factors[m].shape[0] / factors[m].shape[1]
    )
    for mode in order:
        core = mode_product(core, factors[mode], mode)
    return core
