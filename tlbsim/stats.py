"""Statistics helpers over SciPy: Student t quantiles and intervals over replications."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as _stats


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom."""
    if not 0.0 < p < 1.0:
        raise ValueError("p must be in (0, 1)")
    if df <= 0:
        raise ValueError("df must be > 0")
    return float(_stats.t.ppf(p, df))


def mean_ci(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): a two-sided Student t interval for the mean of
    independent replications (nan bounds with fewer than two)."""
    x = np.asarray([v for v in values if v == v], dtype=float)
    if not x.size:
        return math.nan, math.nan, math.nan
    m = float(x.mean())
    if x.size < 2:
        return m, math.nan, math.nan
    half = t_quantile(0.5 + confidence / 2, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return m, m - half, m + half
