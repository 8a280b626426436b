"""Medians and spreads of paired samples."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 1]; works for one value too."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Median, interquartile range and sample count."""
    return {
        "median": percentile(values, 0.5),
        "p25": percentile(values, 0.25),
        "p75": percentile(values, 0.75),
        "n": len(values),
    }


def paired(samples: Sequence[float], reference: Sequence[float]) -> dict[str, Any]:
    """Difference and ratio of each sample to the reference sample of the same round."""
    diffs = [a - b for a, b in zip(samples, reference)]
    ratios = [a / b for a, b in zip(samples, reference) if b > 0]
    return {"diff": summary(diffs), "ratio": summary(ratios)}
