"""Confidence intervals over seeds: what makes a difference between two grid cells mean something.

Every sweep cell is trained with several seeds (the seed sets the initialization and the data
order; the data and its label noise stay fixed).  Two cells trained with the same seeds are
*paired*: the per-seed difference removes the seed's shared luck, so paired intervals are much
tighter than comparing two means.  Intervals are Student-t intervals over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from scipy.stats import t as student_t

LEVEL = 0.95


def t_quantile(df: int, level: float = LEVEL) -> float:
    """The two-sided Student-t quantile ``t_{(1+level)/2, df}``."""
    if df < 1:
        raise ValueError(f"df must be >= 1; got {df}")
    return float(student_t.ppf(0.5 + level / 2, df))


def interval(values: Sequence[float], level: float = LEVEL) -> dict[str, float]:
    """Mean and the half-width of its ``level`` t-interval over ``values`` (one per seed).

    ``half_width`` is ``nan`` with fewer than two values: one seed says nothing about noise.
    """
    n = len(values)
    if n == 0:
        raise ValueError("values is empty")
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "half_width": math.nan, "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"mean": mean, "half_width": t_quantile(n - 1, level) * sd / math.sqrt(n), "n": n}


def paired(
    a: Mapping[int, float], b: Mapping[int, float], level: float = LEVEL
) -> dict[str, float] | None:
    """``a - b`` paired by seed: the interval of the per-seed differences over the seeds both
    have (``None`` when they share none)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    return interval([a[s] - b[s] for s in seeds], level)


def excludes_zero(diff: Mapping[str, float] | None) -> bool:
    """Whether a paired difference is significant: its interval lies on one side of zero."""
    if diff is None or not math.isfinite(diff["half_width"]):
        return False
    return abs(diff["mean"]) > diff["half_width"]
