"""benchmarks/stats.py: the intervals and verdicts every claim rests on."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import stats  # noqa: E402


def test_an_interval_covers_the_mean_and_narrows_with_more_examples():
    rng = np.random.default_rng(0)
    few = (rng.random((3, 50)) < 0.7).astype(float)
    many = (rng.random((3, 2000)) < 0.7).astype(float)
    for scores in (few, many):
        interval = stats.bootstrap_interval(scores)
        assert interval["low"] <= interval["mean"] <= interval["high"] and interval["seeds"] == 3
        assert interval["mean"] == pytest.approx(scores.mean())
    narrow, wide = stats.bootstrap_interval(many), stats.bootstrap_interval(few)
    assert narrow["high"] - narrow["low"] < 0.5 * (wide["high"] - wide["low"])
    # resampling examples gives variance 0.21 / 6000; resampling the 3 seeds adds the spread of their means, each over
    # 2,000 examples (0.21 / 2000 / 3): +-1.96 * sqrt(3.5e-5 + 3.5e-5) = +-0.0164 (conservative, as meant)
    assert narrow["high"] - narrow["low"] == pytest.approx(2 * 0.0164, rel=0.2)


def test_seeds_that_disagree_widen_the_interval():
    examples = np.ones((1, 200))
    agreeing = np.vstack([examples * 0.7] * 4)
    disagreeing = np.vstack([examples * v for v in (0.5, 0.6, 0.8, 0.9)])
    calm, spread = stats.bootstrap_interval(agreeing), stats.bootstrap_interval(disagreeing)
    assert calm["low"] == calm["high"] == pytest.approx(0.7)
    assert spread["low"] < 0.62 and spread["high"] > 0.78


def test_paired_difference_and_verdicts():
    rng = np.random.default_rng(1)
    base = (rng.random((3, 500)) < 0.6).astype(float)
    better = np.maximum(base, (rng.random((3, 500)) < 0.2).astype(float))  # never worse, right ~8% more often
    difference = stats.paired_difference(better, base)
    assert difference["low"] > 0 and stats.verdict(difference) == "holds"
    assert stats.verdict(stats.paired_difference(base, better)) == "does not hold"
    assert stats.verdict(stats.paired_difference(base, base)) == "cannot tell"
    assert stats.verdict(stats.paired_difference(better[:1], base[:1])) == "cannot tell"  # one seed
    assert stats.verdict(difference, threshold=0.5) == "does not hold"
    assert "3 seeds" in stats.describe(difference)
    with pytest.raises(ValueError, match="same seeds and examples"):
        stats.paired_difference(base, base[:, :10])


def test_ratio_interval_and_claims_where_lower_is_better():
    rng = np.random.default_rng(2)
    lora = rng.gamma(2.0, 0.2, (3, 400))  # per-example losses, mean 0.4
    close = lora * 1.01 + rng.normal(0, 0.01, lora.shape)
    far = lora * 1.3
    ratio = stats.ratio_interval(close, lora)
    assert ratio["mean"] == pytest.approx(close.mean() / lora.mean())
    assert ratio["low"] < 1.01 < ratio["high"] < 1.05
    assert stats.verdict(ratio, threshold=1.05, above=False) == "holds"  # within 5%: the whole interval below 1.05
    assert stats.verdict(stats.ratio_interval(far, lora), threshold=1.05, above=False) == "does not hold"
    assert stats.verdict(stats.ratio_interval(far[:2], lora[:2]), threshold=1.05, above=False) == "cannot tell"
    # the same draws as bootstrap_interval: a ratio to a constant matrix is the interval of the mean, scaled
    constant = stats.ratio_interval(far, np.ones_like(far))
    plain = stats.bootstrap_interval(far)
    assert (constant["low"], constant["high"]) == pytest.approx((plain["low"], plain["high"]))
    with pytest.raises(ValueError, match="same seeds and examples"):
        stats.ratio_interval(far, lora[:, :10])


def test_a_claim_over_several_settings():
    assert stats.combined(["holds", "holds"]) == "holds"
    assert stats.combined(["holds", "cannot tell"]) == "cannot tell"
    assert stats.combined(["holds", "does not hold", "cannot tell"]) == "does not hold"
    assert stats.combined([]) == "cannot tell"
