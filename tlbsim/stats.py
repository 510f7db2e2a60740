"""Statistics helpers over SciPy: Student t quantiles and intervals over replications.

``mean_ci``: a Student t interval, for quantities that can be negative (paired differences).
``nonnegative_mean_ci``: for quantities that cannot (latencies, counts, times, rates): no bound below 0.
``wilson_interval`` and ``event_fraction_ci``: for a fraction of events (k of n), bounds in [0, 1].
"""

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


#: how ``nonnegative_mean_ci`` and ``event_fraction_ci`` make their intervals, for a table's legend
NONNEGATIVE_METHOD = ("the hull of a Student t interval (cut at 0) and a log-normal (modified Cox) interval "
                      "for the mean, over replications (Student t alone if a replication is 0)")
EVENT_FRACTION_METHOD = ("pooled events / pooled trials; the hull of a Wilson score interval over the pooled "
                         "trials and the interval above over the replications' fractions, within [0, 1]")


def nonnegative_mean_ci(values, confidence: float = 0.95, upper: float = math.inf) -> tuple[float, float, float]:
    """(mean, low, high): an interval for the mean of independent replications of a quantity that is
    never negative (a latency, a count, a time, a rate), with 0 <= low <= high <= ``upper`` (1 for a
    fraction of time); nan bounds with fewer than two replications.

    The interval is the hull (the smallest interval holding both) of
      * the Student t interval, cut at 0: right when the replications' mean is close to normal
        (the central limit theorem, as replications or each run's sample grow); cutting it at 0
        (and at ``upper``) changes nothing about whether it holds the true mean, which is never
        below 0; and
      * the modified Cox interval (Armstrong 1992; Olsson 2005) for the mean of a log-normal:
        exp(ybar + s^2/2 -+ t * sqrt(s^2/n + s^4/(2(n-1)))) with y = log(value): right when the
        replications are skewed like a log-normal (a p99 that one replication's burst lifted),
        where the t interval falls below 95 % (0.80 at n = 5, sigma = 1) and crosses 0.
    It holds the true mean whenever either does, so it is right under either assumption; the
    price is width. Why not the alternatives: a percentile bootstrap of the mean is far too
    narrow with the 2-10 replications a run has (coverage 0.45 at n = 2, 0.70 at n = 5 for a
    log-normal with sigma = 1); a t interval on the log scale, exp-transformed, is an interval for
    the geometric mean, not the mean (0.24 at n = 30, sigma = 1); the Cox interval alone is an
    interval for the mean only if the replications are log-normal (0.34 at n = 30 for a
    bimodal p99), which the t half of the hull covers.

    Zeros: all zero gives [0, 0] (every replication agrees); some zero (a count of rare events)
    leaves no logarithm, so the interval is the Student t interval cut at 0 alone.

    No interval from n replications can hold a mean made by events rarer than 1 in n runs (a
    burst that no replication met): more replications are the only cure."""
    x = np.asarray([v for v in values if v == v], dtype=float)
    if np.isinf(x).any() or (x < 0).any():
        raise ValueError("nonnegative_mean_ci takes finite values >= 0")
    if not upper >= 0:
        raise ValueError("upper must be >= 0")
    if not x.size:
        return math.nan, math.nan, math.nan
    m = float(x.mean())
    if x.size < 2:
        return m, math.nan, math.nan
    _, low, high = mean_ci(x, confidence)
    low = max(low, 0.0)
    if (x > 0).all():
        n, y = x.size, np.log(x)
        s2 = float(y.var(ddof=1))
        centre = float(y.mean()) + s2 / 2
        half = t_quantile(0.5 + confidence / 2, n - 1) * math.sqrt(s2 / n + s2 * s2 / (2 * (n - 1)))
        low = min(low, math.exp(centre - half))
        high = max(high, math.exp(centre + half) if centre + half < 709 else math.inf)
    return m, min(low, upper), min(high, upper)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float, float]:
    """(k/n, low, high): the Wilson score interval for a binomial proportion, k events in n
    independent trials; 0 <= low <= k/n <= high <= 1 (nan with no trials). Unlike the Wald interval
    (k/n -+ z sqrt(p(1-p)/n)) it is not [0, 0] for 0 events, and it stays within [0, 1]."""
    if not (0 <= k <= n):
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return math.nan, math.nan, math.nan
    p = k / n
    z = float(_stats.norm.ppf(0.5 + confidence / 2))
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # exact at the ends (k = 0: low is 0; k = n: high is 1), not 1e-17 away from them
    low = 0.0 if k == 0 else max(0.0, min(p, centre - half))
    high = 1.0 if k == n else min(1.0, max(p, centre + half))
    return p, low, high


def event_fraction_ci(events, trials, confidence: float = 0.95) -> tuple[float, float, float]:
    """(pooled fraction, low, high) of events over trials across replications (``events[r]`` of
    ``trials[r]`` in replication r: incomplete shootdowns of all shootdowns), within [0, 1].

    The point is the pooled fraction sum(events) / sum(trials). The interval is the hull of the
    Wilson score interval over the pooled trials and ``nonnegative_mean_ci`` over the replications'
    own fractions. The Wilson interval alone treats every trial as an independent coin: it gives
    0 events a bound above 0, but shootdowns of one run are not independent (those still in flight
    at the end are the ones a backlog held), so replications can disagree far more than binomial
    noise allows, and then the replications' own interval is the honest one. The hull is right
    when either is (nan with no trials)."""
    k = [int(e) for e in events]
    n = [int(t) for t in trials]
    if len(k) != len(n):
        raise ValueError("events and trials need one entry per replication")
    p, low, high = wilson_interval(sum(k), sum(n), confidence)
    if p != p:
        return p, low, high
    per = [a / b for a, b in zip(k, n, strict=True) if b]
    if len(per) >= 2:
        _, rlow, rhigh = nonnegative_mean_ci(per, confidence, upper=1.0)
        low, high = min(low, rlow), max(high, rhigh)
    return p, low, high
