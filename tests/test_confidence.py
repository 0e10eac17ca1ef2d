"""Seed statistics: t-intervals and paired differences, on numbers whose answers are known."""

import math

import pytest

from mupp.lab import confidence

T2 = 4.302652729911275  # t_{0.975, 2}


def test_t_interval_matches_the_textbook_formula():
    r = confidence.interval([1.0, 2.0, 3.0])
    assert r["mean"] == 2.0 and r["n"] == 3
    assert r["half_width"] == pytest.approx(T2 * 1.0 / math.sqrt(3))
    assert confidence.t_quantile(1000) == pytest.approx(1.962, abs=1e-3)
    assert math.isnan(confidence.interval([0.5])["half_width"])
    with pytest.raises(ValueError, match="empty"):
        confidence.interval([])


def test_pairing_removes_the_shared_seed_effect():
    a = {0: 0.50, 1: 0.60, 2: 0.70}
    b = {0: 0.40, 1: 0.50, 2: 0.60}
    d = confidence.paired(a, b)
    assert d["mean"] == pytest.approx(0.1) and d["half_width"] == pytest.approx(0.0, abs=1e-12)
    assert confidence.excludes_zero(d)
    # unpaired, the same numbers overlap completely
    assert confidence.interval(list(a.values()))["half_width"] > 0.1
    assert confidence.paired(a, {5: 0.1}) is None
    assert not confidence.excludes_zero(confidence.paired({0: 0.5}, {0: 0.4}))  # one seed
