"""How far the advice's goodput comparisons can be trusted: the spread of the timings they rest on,
propagated to each batch's goodput ratio. PURE.

The advice (advice.py) compares goodput(B) = B / T(B) x efficiency(B) with the run's own
goodput, where T(B) = T0 - a t(m0) + n t(m): T0 the median step time measured in training (over
N log intervals), t(m) one micro-step timed after training at micro-batch m (the median of its
repeats, speed.py), a and m0 the run's accumulation and micro-batch, n = B / W / m. So
ln(ratio) = ln(B efficiency / B0) + ln T0 - ln T(B), and its spread is the root sum of squares
of each timing's spread times its derivative (independent measurements):

- an interval's step time varies from one log interval to the next by r (1.4826 x the median
  absolute deviation over the median: a robust standard deviation); T0, their median over N,
  varies by 1.2533 r T0 / sqrt(N) (the standard error of a median);
- a micro-step timing is taken at one moment, as one interval is: it varies by r too, or by half
  the range of its own repeats where that is more (old runs did not log the repeats: r).

The noise scale's own uncertainty (the efficiency term) is not in it: one run gives one estimate.
"""

from __future__ import annotations

import math
import statistics

MIN_INTERVALS = 3  # fewer log intervals than this: their spread is not measured


def interval_spread(spans: list[float]) -> float | None:
    """The relative robust standard deviation of the per-interval step times (1.4826 MAD /
    median), or None with fewer than MIN_INTERVALS intervals."""
    if len(spans) < MIN_INTERVALS:
        return None
    median = statistics.median(spans)
    if median <= 0:
        return None
    return 1.4826 * statistics.median(abs(s - median) for s in spans) / median


def repeat_spread(repeats: list[float]) -> float:
    """Half the range of a timing's repeats over their median (0 for a single repeat)."""
    median = statistics.median(repeats)
    return (max(repeats) - min(repeats)) / 2 / median if median > 0 else 0.0


def micro_spreads(
    micro_seconds: dict[int, float], repeats: dict[int, list[float]], interval: float
) -> dict[int, float]:
    """Each micro-step timing's relative spread: the intervals' `interval`, or half the range of
    its repeats where that is more."""
    return {
        m: max(interval, repeat_spread(repeats[m]) if repeats.get(m) else 0.0)
        for m in micro_seconds
    }


def ratio_spread(
    timing: tuple[int, int],
    now: tuple[int, int],
    step_seconds: tuple[float, float],
    micro_seconds: dict[int, float],
    spreads: dict[int, float],
) -> float:
    """The relative spread of goodput(B) / goodput(now) for a batch whose step runs `timing` =
    (n, m): n micro-steps of micro-batch m, against the run's `now` = (a, m0), from
    `step_seconds` = (T0, its standard error) and each micro-step timing's relative spread.
    T(B) = max(T0 - a t(m0), 0) + n t(m), as advice.step_time computes it."""
    (n, m), (a, m0) = timing, now
    t0, t0_error = step_seconds
    besides = t0 - a * micro_seconds[m0]
    total = max(besides, 0.0) + n * micro_seconds[m]
    d_t0 = 1 / t0 - (1 / total if besides > 0 else 0.0)  # d ln(ratio) / d T0
    d_micro = {m: -n / total}  # d ln(ratio) / d t(m), per timing
    if besides > 0:
        d_micro[m0] = d_micro.get(m0, 0.0) + a / total
    terms = [d_t0 * t0_error] + [d * spreads[k] * micro_seconds[k] for k, d in d_micro.items()]
    return math.sqrt(sum(x * x for x in terms))


def median_error(spans: list[float], interval: float) -> float:
    """The standard error of the median of `spans` whose relative spread is `interval`."""
    return 1.2533 * interval * statistics.median(spans) / math.sqrt(len(spans))
