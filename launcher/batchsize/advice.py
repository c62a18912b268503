"""Which global batch is worth it, from what a run measured (its metrics.jsonl). PURE.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training"): the steps S and samples E
to reach a given loss follow S = S_min (1 + B_crit/B) and E = E_min (1 + B/B_crit), with the
critical batch B_crit close to the gradient noise scale, whose measurable form is
B_simple = tr(Sigma)/|G|^2 (launcher/batchsize/noise.py). Below B_crit a bigger batch buys fewer
steps almost for free; far above it, it only spends more samples.

Pollux (Qiao et al., OSDI'21): goodput(B) = throughput(B) x efficiency(B), with the statistical
efficiency efficiency(B) = (phi + B0)/(phi + B) for noise scale phi: the progress one sample makes
at batch B relative to batch B0 (here B0 = the run's batch, so "vs now" is a plain ratio).

Throughput, measured: after training, launcher/training/speed.py times one micro-step (forward,
backward) at micro-batches 2, 4, 8, ... up to the plan's cap. What a step spends besides its
micro-steps (loading, all-reduce, optimizer, the loop), t_step, is the step time measured in
training minus accumulation x t_micro(micro) of the run's plan. A step of global batch B on W ranks
then takes t_step + (B/W / m) t_micro(m), m the largest measured micro-batch dividing B/W
(accumulation beyond the largest): at the run's own batch this is the measured step time.

The candidates are W x 2^k and the run's batch. Each goodput ratio to the run's own carries a
spread, derived from the spread of the timings it rests on (spread.py): identical runs on a busy
machine time differently, and a gain within the spread would send the next run to a batch at
random. The candidates whose goodput is within the spread of the highest are as good as the
measurement can tell; of them the one nearest the run's batch is recommended: the run's own
batch (kept, with the reason) when the best gain is within its spread, else the smallest change
that gains more than the spread.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from launcher.batchsize import spread

PHASES = (0.1, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Advice:
    global_batch: int
    world_size: int
    noise_scale: float  # B_crit of the run: critical_batch()
    phases: tuple[tuple[float, float], ...]  # (fraction of the run's samples, B_simple there)
    points: int  # log lines the run estimate averages
    step_seconds: float  # measured in training at the run's batch (evaluation excluded)
    t_step: float  # seconds per step besides its micro-steps
    micro_seconds: dict[int, float]  # seconds per micro-step, by micro-batch (speed.py)
    recommended: int  # of the candidates `near`, the one nearest the run's batch
    near: tuple[int, ...]  # the candidates within the spread of the highest goodput
    rows: tuple[tuple[int, int, float, float, float], ...]  # (B, micro, samples/s, eff., vs now)
    epochs: float = 0.0  # the run's length in epochs
    target: str = ""  # the result `to_target` counts to, in words ("" when not reached)
    to_target: tuple[float, ...] = ()  # per row: epochs that batch needs to reach it
    best: int = 0  # the candidate with the highest goodput
    spreads: tuple[float, ...] = ()  # per row: the spread of "vs now" (same units; now: 0)
    intervals: int = 0  # the training log intervals the step time is the median of
    interval_spread: float | None = None  # their relative spread (None: too few to tell)
    repeats: int = 0  # the repeats of each micro-step timing (0: not logged, an older run)
    repeat_spread: float = 0.0  # the largest relative half-range of a timing's repeats


def efficiency(batch: float, noise: float, base: float) -> float:
    """Progress per sample at `batch` relative to `base` (Pollux)."""
    return (noise + base) / (noise + batch)


def samples_to_match(noise: float, from_batch: int, from_samples: float, batch: int) -> float:
    """Samples batch `batch` needs for the progress `from_samples` made at `from_batch`:
    E = E_min (1 + B/B_crit) at both, so E_0 (B_crit + B) / (B_crit + B_0)."""
    return from_samples / efficiency(batch, noise, from_batch)


def step_time(
    batch: int, world: int, t_step: float, micro_seconds: dict[int, float]
) -> tuple[float, int] | None:
    """(seconds per step, micro-batch) of global batch `batch` on `world` ranks, or None when
    no measured micro-batch divides the per-device batch."""
    per_device = batch // world
    fits = [m for m in micro_seconds if per_device % m == 0]
    if batch % world or not fits:
        return None
    m = max(fits)
    return t_step + per_device // m * micro_seconds[m], m


def critical_batch(records: list[dict[str, Any]], batch: int) -> tuple[float, int] | None:
    """(B_crit, points): the noise scale averaged over a run the way a fixed batch meets it.

    A log line's estimates give phi_t = grad_trace / grad_sq. In the empirical model a step at
    batch B makes w_t = 1/(1 + phi_t/B) steps' worth of progress at the minimal step count, so
    over a whole run S(B) = S_min (1 + B_crit/B) with B_crit = sum w_t phi_t / sum w_t, B_t the
    batch the line was trained at. Written with the two averages, w = B g / (B g + t) and
    w phi = B t / (B g + t), a line whose |G|^2 average is not positive (noise dominates:
    phi -> infinity) counts as w = 0, w phi = B instead of being dropped, which would bias the
    estimate down.
    """
    num = den = 0.0
    points = 0
    for r in records:
        terms = progress_terms(r, batch)
        if terms is not None:
            num, den, points = num + terms[0], den + terms[1], points + 1
    return (num / den, points) if den > 0 else None


def progress_terms(r: dict[str, Any], batch: int) -> tuple[float, float] | None:
    """One log line's (w phi, w) for critical_batch, or None when it has no usable estimate."""
    if r.get("grad_sq") is None or r.get("grad_trace") is None:
        return None
    b, g, t = r.get("global_batch", batch), max(r["grad_sq"], 0.0), r["grad_trace"]
    if b * g + t <= 0:
        return None
    return b * t / (b * g + t), b * g / (b * g + t)


def step_spans(train: list[dict[str, Any]], batch: int) -> list[float]:
    """Training seconds per step between consecutive log lines at global batch `batch` (train_s
    leaves evaluation and checkpoints out)."""
    lines = [r for r in train if r.get("train_s") is not None]
    lines = [r for r in lines if r.get("global_batch", batch) == batch]
    return [
        (b["train_s"] - a["train_s"]) / (b["step"] - a["step"])
        for a, b in zip(lines, lines[1:], strict=False)
        if b["step"] > a["step"]
    ]


def seconds_per_step(train: list[dict[str, Any]], batch: int) -> float | None:
    """The median of step_spans, or None without one."""
    spans = step_spans(train, batch)
    return statistics.median(spans) if spans else None


def candidates(world: int, current: int, limit: int) -> list[int]:
    """Global batches to compare: world x 2^k up to `limit` (the training set), and the run's."""
    out, b = {current}, world
    while b <= limit:
        out.add(b)
        b *= 2
    return sorted(out)


def _timings(
    records: list[dict[str, Any]], plan: dict[str, Any]
) -> tuple[list[float], dict[int, float], dict[int, list[float]]] | None:
    """(step spans at the run's batch, seconds per micro-step, their repeats) or None where the
    run did not time its steps and its micro-steps (at its own micro-batch too)."""
    train = [r for r in records if "loss" in r]
    spans = step_spans(train, plan["global_batch"])
    timed = [r for r in records if r.get("micro_step_seconds")]
    if not spans or not timed:
        return None
    micro_seconds = {int(k): v for k, v in timed[-1]["micro_step_seconds"].items()}
    repeats = {int(k): v for k, v in (timed[-1].get("micro_step_repeats") or {}).items()}
    if plan["micro_batch"] not in micro_seconds:
        return None
    return spans, micro_seconds, repeats


def nearest(rows: list[tuple[int, int, float, float, float]], now: int) -> int:
    """The batch of `rows` closest to `now` on a log scale (of two as close, the higher
    goodput): the smallest change the measurement supports."""
    return min(rows, key=lambda row: (abs(math.log2(row[0] / now)), -row[4]))[0]


def _phases(train: list[dict[str, Any]]) -> tuple[tuple[float, float], ...]:
    """(fraction of the run's samples, the logged B_simple at it) at PHASES."""
    total = train[-1]["samples"]
    with_noise = [r for r in train if r.get("noise_scale") is not None]
    phases = []
    for fraction in PHASES:
        at = next((r for r in with_noise if r["samples"] >= fraction * total), None)
        if at is not None:
            phases.append((fraction, at["noise_scale"]))
    return tuple(phases)


def advise(
    records: list[dict[str, Any]], plan: dict[str, Any], reached: tuple[str, int] | None = None
) -> Advice | None:
    """The advice from a run's metrics lines and its plan.json; None without a noise scale or
    the timings (trainer.noise_scale=false, backend=deepspeed, a run cut short). `reached`:
    (the target in words, the samples this run took to reach it), for each batch's epochs to it
    (samples_to_match)."""
    train = [r for r in records if "loss" in r]
    gb, world = plan["global_batch"], plan["world_size"]
    estimate = critical_batch(train, gb)
    timings = _timings(records, plan)
    if estimate is None or timings is None:
        return None
    spans, micro_seconds, repeats = timings
    noise, points = estimate
    step_seconds = statistics.median(spans)
    now = (plan["accumulation"], plan["micro_batch"])
    t_step = max(step_seconds - now[0] * micro_seconds[now[1]], 0.0)
    r = spread.interval_spread(spans)
    each = spread.micro_spreads(micro_seconds, repeats, r or 0.0)
    measured = (step_seconds, spread.median_error(spans, r or 0.0))
    rows, spreads = [], []
    for b in candidates(world, gb, plan["epoch_samples"]):
        timing = step_time(b, world, t_step, micro_seconds)
        if b == gb:  # as the run trained it: the measured step
            timing = (step_seconds, plan["micro_batch"])
        if timing is None:
            continue
        e = efficiency(b, noise, gb)
        ratio = b / timing[0] * e * step_seconds / gb
        rows.append((b, timing[1], b / timing[0], e, ratio))
        steps_of = ((b // world) // timing[1], timing[1])
        relative = spread.ratio_spread(steps_of, now, measured, micro_seconds, each)
        spreads.append(0.0 if b == gb else ratio * relative)
    top = max(range(len(rows)), key=lambda i: rows[i][4])
    floor = rows[top][4] - spreads[top] if r is not None else rows[top][4]
    tied = [row for row in rows if row[4] >= floor]
    epoch_samples = plan["epoch_samples"]
    target, to_target = "", ()
    if reached is not None:
        target = reached[0]
        to_target = tuple(
            samples_to_match(noise, gb, reached[1], row[0]) / epoch_samples for row in rows
        )
    return Advice(
        global_batch=gb,
        world_size=world,
        noise_scale=noise,
        phases=_phases(train),
        points=points,
        step_seconds=step_seconds,
        t_step=t_step,
        micro_seconds=micro_seconds,
        recommended=nearest(tied, gb) if r is not None else gb,
        near=tuple(row[0] for row in tied),
        rows=tuple(rows),
        epochs=train[-1]["samples"] / epoch_samples,
        target=target,
        to_target=to_target,
        best=rows[top][0],
        spreads=tuple(spreads),
        intervals=len(spans),
        interval_spread=r,
        repeats=min((len(v) for v in repeats.values()), default=0),
        repeat_spread=max((spread.repeat_spread(v) for v in repeats.values() if v), default=0.0),
    )


def format_advice(a: Advice) -> str:
    """The advice, with the numbers that led to it."""
    over = ", ".join(f"{v:,.0f} at {f:.0%}" for f, v in a.phases)
    b = a.noise_scale
    sizes = sorted(a.micro_seconds)
    lines = [
        "batch-size advice (McCandlish et al. 2018; Pollux, Qiao et al. 2021)",
        f"  gradient noise scale B_simple = tr(Sigma)/|G|^2 at these fractions of the run's "
        f"samples: {over} (it tends to grow as the loss falls, McCandlish et al.)",
        f"  critical batch of the run ~ {b:,.0f}: B_simple averaged over {a.points} log points, "
        "each weighted by the progress a step makes there, 1/(1 + B_simple/B); steps to the "
        "same result ~ S_min (1 + B_crit/B): below it a bigger batch nearly halves the steps, "
        "far above it the steps barely drop and the extra samples are spent",
        f"  throughput now: {a.global_batch / a.step_seconds:,.0f} samples/s at global batch "
        f"{a.global_batch:,} ({a.step_seconds * 1e3:.3g} ms per step measured in training, "
        "evaluation excluded)",
        "  timings: a micro-step (forward + backward, timed after training) at micro-batch "
        + ", ".join(f"{m}: {a.micro_seconds[m] * 1e3:.3g} ms" for m in sizes)
        + f"; besides its micro-steps a step spends {a.t_step * 1e3:.3g} ms (loading, all-reduce,"
        " optimizer, loop: the measured step minus its micro-steps)",
        f"  goodput = samples/s x efficiency, efficiency = ({b:,.0f} + {a.global_batch:,}) / "
        f"({b:,.0f} + B) (progress per sample relative to now)",
        spread_line(a),
        recommendation(a),
    ]
    if a.to_target:
        lines.append(
            f"  epochs to {a.target} at each batch: this run's samples to it x (B_crit + B) / "
            f"(B_crit + {a.global_batch:,}) (E = E_min (1 + B/B_crit)); this run trained "
            f"{a.epochs:.3g}: a batch marked SHORT would not get there in as many epochs"
        )
    head = f"  {'global batch':>14} {'micro':>7} {'samples/s':>12} {'efficiency':>11} "
    lines.append(
        head
        + f"{'goodput vs now':>15}{'spread':>8}"
        + (f"{'epochs to it':>14}" if a.to_target else "")
    )
    for i, (batch, micro, speed, e, g) in enumerate(a.rows):
        mark = "  <- recommended" if batch == a.recommended else ""
        mark += "  (now)" if batch == a.global_batch else ""
        if a.to_target:
            need = a.to_target[i]
            short = " SHORT" if need > a.epochs * (1 + 1e-9) else ""
            mark = f"{need:>14.3g}{short}{mark}"
        plus = "-" if batch == a.global_batch or not a.spreads else f"±{a.spreads[i]:.3f}"
        lines.append(
            f"  {batch:>14,} {micro:>7,} {speed:>12,.0f} {e:>11.3f} {g:>15.3f}{plus:>8}{mark}"
        )
    return "\n".join(lines)


def spread_line(a: Advice) -> str:
    """Where the spread of the goodput comparison comes from."""
    if a.interval_spread is None:
        return (
            f"  spread: not measured ({a.intervals} timed log interval(s) at this batch; "
            f"{spread.MIN_INTERVALS} are needed)"
        )
    repeats = (
        f", or by half the range of its {a.repeats} repeats where more (up to "
        f"±{a.repeat_spread:.1%})"
        if a.repeats
        else " (its repeats were not logged)"
    )
    return (
        f"  spread: the step time varies by ±{a.interval_spread:.1%} between the run's "
        f"{a.intervals} log intervals (1.4826 MAD / median); a micro-step timing by as much"
        f"{repeats}; both carried to each batch's goodput vs now (the spread column; the noise "
        "scale's own uncertainty is not in it)"
    )


def recommendation(a: Advice) -> str:
    """The recommended batch and why: a gain above the spread, or the run's batch kept."""
    now, chosen = a.global_batch, a.recommended
    gains = {row[0]: row[4] - 1 for row in a.rows}
    top = a.best if a.best in gains else chosen  # an Advice made without its best: the chosen
    plus = dict(zip((row[0] for row in a.rows), a.spreads, strict=False)).get(top, 0.0)
    best = f"{gains.get(top, 0.0):.1%} at {top:,}"
    head = f"  recommended global batch: {chosen:,} (now {now:,})"
    if a.interval_spread is None:
        if top == now:
            return f"{head}: no candidate's goodput is higher"
        return (
            f"{head}: keep global_batch={now:,}: the best gain, {best}, cannot be told from the "
            "timings' noise, whose spread was not measured"
        )
    tied = f"within the spread of the best goodput: {', '.join(f'{b:,}' for b in a.near)}"
    if chosen == now and top == now:
        return f"{head}: no candidate's goodput is higher; {tied}"
    if chosen == now:
        return (
            f"{head}: keep global_batch={now:,}: the best gain, {best}, is within the "
            f"measurement's spread of ±{plus:.1%}; {tied}"
        )
    if chosen == top:
        return (
            f"{head}: its goodput gain, {gains[chosen]:.1%}, is above the measurement's spread "
            f"of ±{plus:.1%}; {tied}"
        )
    return (
        f"{head}: the best gain, {best}, is above the measurement's spread of ±{plus:.1%}, and "
        f"{chosen:,}'s {gains[chosen]:.1%} is within that spread of it: the smallest change the "
        f"measurement supports; {tied}"
    )


def next_run(
    a: Advice, lr: float, why_lr: str, cap: int | None, devices_per_node: int | None
) -> str:
    """A plain sentence: the batch to train next, its LR, and how it lays out on devices."""
    b, w = a.recommended, a.world_size
    now = " (as now)" if b == a.global_batch else f" instead of {a.global_batch:,}"
    text = f"  next: train at global_batch={b:,}{now}: lr {lr:.4g} ({why_lr}; the plan sets it)"
    if a.to_target:
        need = dict(zip((r[0] for r in a.rows), a.to_target, strict=True)).get(b)
        if need is not None and need > a.epochs * (1 + 1e-9):
            text += f", and train >= {need:.3g} epochs to reach {a.target}"
    if cap:
        per = b // w
        devices = math.ceil(b / cap)
        text += f"; on {w} device(s) that is {per:,} samples each"
        text += (
            f" (accumulation {math.ceil(per / cap)} at the memory cap {cap:,})" if per > cap else ""
        )
        if devices > w:
            nodes = ""
            if devices_per_node:
                nodes = f" = {math.ceil(devices / devices_per_node)} node(s) of {devices_per_node}"
            text += f"; {devices} devices{nodes} would need none"
    return text
