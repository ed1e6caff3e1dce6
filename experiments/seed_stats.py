"""Runs of one configuration under several seeds, summarised: mean, sample standard deviation and
the 95% confidence interval of the mean (Student's t, since seeds are few), and whether two
configurations' intervals overlap (then the seeds cannot tell them apart).

The t quantile is computed here (integrating the t density, then bisecting) rather than taken
from scipy, which polyhead does not otherwise need.
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass

CONFIDENCE = 0.95


def t_density(x: float, df: int) -> float:
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))


def t_cdf(x: float, df: int, intervals: int = 4000) -> float:
    """P(T <= x) for x >= 0 by Simpson's rule on [0, x] (the density is smooth and symmetric)."""
    h = x / intervals
    inner = sum((4 if i % 2 else 2) * t_density(i * h, df) for i in range(1, intervals))
    return 0.5 + h / 3 * (t_density(0, df) + inner + t_density(x, df))


@functools.lru_cache
def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with df degrees of freedom."""
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2


@dataclass(frozen=True)
class Aggregate:
    """n values -> mean; with n >= 2 also the sample std and the 95% interval of the mean."""

    n: int
    mean: float
    std: float | None = None
    low: float | None = None
    high: float | None = None

    def overlaps(self, other: Aggregate) -> bool:
        if None in (self.low, other.low):
            return False
        return self.low <= other.high and other.low <= self.high

    def text(self) -> str:
        if self.std is None:
            return f"{self.mean:.4g}"
        return f"{self.mean:.4g} ± {self.std:.2g} [{self.low:.4g}, {self.high:.4g}]"


def aggregate(values: list[float]) -> Aggregate:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Aggregate(len(values), mean)
    std = statistics.stdev(values)
    half = t_quantile(1 - (1 - CONFIDENCE) / 2, len(values) - 1) * std / math.sqrt(len(values))
    return Aggregate(len(values), mean, std, mean - half, mean + half)
