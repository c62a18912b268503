"""The critical-batch fit of a sweep, and whether its steps to target can determine it. PURE.

McCandlish et al. 2018 (eq. 2.11): the steps S to a target at batch B follow
S = S_min (1 + B_crit / B). `fit_critical_batch` fits it in log space (relative errors: the steps
span an order of magnitude or more). Two parameters need two distinct batches, and the fit means
something only where the steps were resolved and have the model's shape:

- a run that reached the target at its first evaluation gives only an upper bound on its steps
  (the target may have been reached at any step before): such runs are left out of the fit;
- the steps must fall as the batch grows (else B_crit runs to 0), and the samples S x B must
  grow (else B_crit runs to infinity: every batch is below it and nothing bounds it);
- a B_crit at the edge of the search range is not determined by the runs either.
Where any of these fails there is no fit, and `fit_problem` / `edge_problem` say why.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import numpy as np

SEARCH = 100  # B_crit is searched over [min B / SEARCH, max B x SEARCH]


def fit_critical_batch(batches: Sequence[float], steps: Sequence[float]) -> tuple[float, float]:
    """Least-squares fit of S = S_min (1 + B_crit / B) in log space; returns (S_min, B_crit).

    Minimises sum_i (log S_i - log S_min - log(1 + B_crit / B_i))^2. For a fixed B_crit the best
    log S_min is the mean of the residuals log S_i - log(1 + B_crit / B_i), which leaves a 1-D
    problem in log B_crit: a grid over [min B / SEARCH, max B x SEARCH], then golden-section search
    between the neighbours of the best grid point. Needs 2 distinct batches (ValueError).
    """
    b = np.asarray(batches, dtype=np.float64)
    s = np.asarray(steps, dtype=np.float64)
    if b.shape != s.shape or b.ndim != 1:
        raise ValueError(f"fit_critical_batch: {b.shape} batches but {s.shape} steps")
    if np.any(b <= 0) or np.any(s <= 0):
        raise ValueError("fit_critical_batch: batches and steps must be > 0")
    if len(np.unique(b)) < 2:
        raise ValueError("fit_critical_batch: needs at least 2 distinct batch sizes")
    log_b, log_s = np.log(b), np.log(s)

    def residuals(log_b_crit: np.ndarray) -> np.ndarray:  # (..., n): log S_i - log(1 + Bc/B_i)
        out: np.ndarray = log_s - np.logaddexp(0.0, log_b_crit[..., None] - log_b)
        return out

    def loss(log_b_crit: np.ndarray) -> np.ndarray:
        r = residuals(log_b_crit)
        out: np.ndarray = np.sum((r - r.mean(axis=-1, keepdims=True)) ** 2, axis=-1)
        return out

    grid = np.linspace(log_b.min() - math.log(SEARCH), log_b.max() + math.log(SEARCH), 2001)
    i = int(np.argmin(loss(grid)))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(100):  # the bracket shrinks by 0.618 a step: ~1e-21 of its width
        x1, x2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if loss(np.array(x1)) <= loss(np.array(x2)):
            hi = x2
        else:
            lo = x1
    log_b_crit = np.array((lo + hi) / 2)
    s_min = math.exp(float(residuals(log_b_crit).mean()))
    return s_min, math.exp(float(log_b_crit))


def fit_problem(batches: list[int], steps: list[float]) -> str | None:
    """Why these runs' steps to target cannot determine S = S_min (1 + B_crit / B), or None:
    fewer than 2 distinct batches, steps that do not fall from the smallest batch to the largest
    (medians of the runs at each), or samples that do not grow."""
    by_batch: dict[int, list[float]] = {}
    for b, s in zip(batches, steps, strict=True):
        by_batch.setdefault(b, []).append(s)
    if len(by_batch) < 2:
        return "fewer than 2 batch sizes"
    lo, hi = min(by_batch), max(by_batch)
    s_lo, s_hi = statistics.median(by_batch[lo]), statistics.median(by_batch[hi])
    seen = f"{s_lo:,.0f} steps at B = {lo:,}, {s_hi:,.0f} at B = {hi:,}"
    if s_hi >= s_lo:
        return f"the steps to target do not fall as the batch grows ({seen})"
    if s_hi * hi <= s_lo * lo:
        return (
            f"the samples to target do not grow with the batch ({seen}): every batch is below "
            "the critical batch, and nothing here bounds it"
        )
    return None


def edge_problem(batches: list[int], b_crit: float) -> str | None:
    """Why a fitted B_crit is not determined (at the edge of the search range), or None."""
    low, high = min(batches) / (SEARCH - 1), max(batches) * (SEARCH - 1)
    if low < b_crit < high:
        return None
    return "the fitted B_crit runs to the edge of its search range: these runs do not pin it down"
