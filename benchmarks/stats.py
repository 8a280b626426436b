"""Means of samples and of paired differences, with 95% confidence intervals.

The benchmark reports means, not medians: a mean of paired differences is what
adds up over a suite, and its confidence interval says how far noise could move
it. Ratios are not reported: one strategy's overhead is often close to zero, and
a ratio to it is unstable by construction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

#: two-sided 95% quantiles of Student's t, by degrees of freedom (the largest tabulated df not above n - 1)
_T95 = (
    (1, 12.706),
    (2, 4.303),
    (3, 3.182),
    (4, 2.776),
    (5, 2.571),
    (6, 2.447),
    (7, 2.365),
    (8, 2.306),
    (9, 2.262),
    (10, 2.228),
    (12, 2.179),
    (15, 2.131),
    (20, 2.086),
    (25, 2.060),
    (30, 2.042),
    (40, 2.021),
    (60, 2.000),
    (120, 1.980),
    (1000, 1.962),
)


def t95(df: int) -> float:
    """Student's t quantile for a two-sided 95% interval (conservative between tabulated values)."""
    value = math.inf
    for tab_df, quantile in _T95:
        if tab_df > df:
            break
        value = quantile
    return value


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Mean, half-width of its 95% confidence interval, standard deviation, extremes, count."""
    n = len(values)
    if not n:
        return {"mean": math.nan, "ci95": math.nan, "sd": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    mean = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    ci95 = t95(n - 1) * sd / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "ci95": ci95, "sd": sd, "min": min(values), "max": max(values), "n": n}


def paired(samples: Sequence[float], reference: Sequence[float]) -> dict[str, Any]:
    """Summary of the difference between each sample and the reference sample of the same round."""
    if len(samples) != len(reference):
        raise ValueError(f"paired samples differ in length: {len(samples)} and {len(reference)}")
    return {"diff": summary([a - b for a, b in zip(samples, reference)])}
