"""The statistics behind every quality and merging verdict: means with 95% intervals over seeds and test examples,
paired differences, and the verdict rule. Used by the benchmarks that write per-seed results and by claims.py.

Scores are per seed, per test example (``scores[seed][example]``: 1/0 correctness, or a per-example loss), the same
test examples for every seed. A bootstrap resample draws seeds with replacement and, independently, test examples
with replacement (one draw of example indices shared by the seeds of that resample), and takes the mean; the 95%
interval is the 2.5th and 97.5th percentiles of those means. With one seed only the examples vary, which understates
the run-to-run spread: ``verdict`` says "cannot tell" below ``MIN_SEEDS``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

MIN_SEEDS = 3
RESAMPLES = 4000


def _matrix(scores: Sequence[Sequence[float]]) -> np.ndarray:
    matrix = np.asarray(scores, dtype=np.float64)
    if matrix.ndim != 2 or matrix.size == 0:
        raise ValueError("scores must be per seed, per test example: a non-empty list of equal-length lists")
    return matrix


def _resampled_means(matrices: list[np.ndarray], resamples: int, seed: int) -> np.ndarray:
    """The means of each matrix under the same seeds x examples resamples: shape (resamples, len(matrices))."""
    shapes = {matrix.shape for matrix in matrices}
    if len(shapes) != 1:
        raise ValueError(f"paired scores need the same seeds and examples: {sorted(shapes)}")
    (seeds, examples), rng = shapes.pop(), np.random.default_rng(seed)
    means = np.empty((resamples, len(matrices)))
    for index in range(resamples):
        rows = rng.integers(0, seeds, seeds)
        columns = rng.integers(0, examples, examples)
        means[index] = [matrix[np.ix_(rows, columns)].mean() for matrix in matrices]
    return means


def _interval(value: float, resampled: np.ndarray, seeds: int) -> dict:
    low, high = np.percentile(resampled, [2.5, 97.5])
    return {"mean": float(value), "low": float(low), "high": float(high), "seeds": seeds}


def mean(scores: Sequence[Sequence[float]]) -> float:
    """The mean over seeds and examples (what :func:`bootstrap_interval` reports as ``mean``, without resampling)."""
    return float(_matrix(scores).mean())


def bootstrap_interval(scores: Sequence[Sequence[float]], resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Mean over seeds and examples, and its 95% interval (seeds x examples bootstrap)."""
    matrix = _matrix(scores)
    return _interval(matrix.mean(), _resampled_means([matrix], resamples, seed)[:, 0], matrix.shape[0])


def ratio_interval(
    a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], resamples: int = RESAMPLES, seed: int = 0
) -> dict:
    """``mean(a) / mean(b)`` paired by seed and test example, with its 95% interval (the same resamples of both)."""
    first, second = _matrix(a), _matrix(b)
    means = _resampled_means([first, second], resamples, seed)
    return _interval(first.mean() / second.mean(), means[:, 0] / means[:, 1], first.shape[0])


def paired_difference(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], **kwargs) -> dict:
    """``a - b`` paired by seed and test example (both ran with seed i on example j), with its 95% interval."""
    first, second = _matrix(a), _matrix(b)
    if first.shape != second.shape:
        raise ValueError(f"paired scores need the same seeds and examples: {first.shape} vs {second.shape}")
    return bootstrap_interval(first - second, **kwargs)


def verdict(interval: dict, threshold: float = 0.0, above: bool = True) -> str:
    """ "holds" when the whole interval lies above ``threshold`` (``above=False``: below it), "does not hold" when it
    lies on the other side, else "cannot tell"; fewer than MIN_SEEDS seeds is "cannot tell" whatever the interval."""
    if interval["seeds"] < MIN_SEEDS:
        return "cannot tell"
    if interval["low"] > threshold:
        return "holds" if above else "does not hold"
    if interval["high"] < threshold:
        return "does not hold" if above else "holds"
    return "cannot tell"


def combined(verdicts: Sequence[str]) -> str:
    """One claim measured in several settings: "holds" when it holds in every one, "does not hold" when it does not
    hold in one, else "cannot tell"."""
    if not verdicts:
        return "cannot tell"
    if all(v == "holds" for v in verdicts):
        return "holds"
    return "does not hold" if "does not hold" in verdicts else "cannot tell"


def describe(interval: dict, digits: int = 3) -> str:
    """``0.712 [0.690, 0.733], 3 seeds``."""
    seeds = interval["seeds"]
    return (
        f"{interval['mean']:.{digits}f} [{interval['low']:.{digits}f}, {interval['high']:.{digits}f}], "
        f"{seeds} seed{'s' if seeds != 1 else ''}"
    )
