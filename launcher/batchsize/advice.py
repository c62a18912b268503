"""Which global batch is worth it, from what a run measured (its metrics.jsonl). PURE.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training"): the steps S and samples E
to reach a given loss follow S = S_min (1 + B_crit/B) and E = E_min (1 + B/B_crit), with the
critical batch B_crit close to the gradient noise scale, whose measurable form is
B_simple = tr(Sigma)/|G|^2 (launcher/batchsize/noise.py). Below B_crit a bigger batch buys fewer
steps almost for free; far above it, it only spends more samples.

Pollux (Qiao et al., OSDI'21): goodput(B) = throughput(B) x efficiency(B), with the statistical
efficiency efficiency(B) = (phi + B0)/(phi + B) for noise scale phi: the progress one sample makes
at batch B relative to batch B0 (here B0 = the run's batch, so "vs now" is a plain ratio).

Throughput, measured: after training, launcher/batchsize/speed.py times one micro-step (forward,
backward) at micro-batches 2, 4, 8, ... up to the plan's cap. What a step spends besides its
micro-steps (loading, all-reduce, optimizer, the loop), t_step, is the step time measured in
training minus accumulation x t_micro(micro) of the run's plan. A step of global batch B on W ranks
then takes t_step + (B/W / m) t_micro(m), m the largest measured micro-batch dividing B/W
(accumulation beyond the largest): at the run's own batch this is the measured step time. The
recommended batch is the candidate (W x 2^k, and the run's) with the highest goodput.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

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
    recommended: int  # the candidate batch with the highest goodput
    near: tuple[int, ...]  # the candidates within 10% of the highest goodput
    rows: tuple[tuple[int, int, float, float, float], ...]  # (B, micro, samples/s, eff., vs now)
    epochs: float = 0.0  # the run's length in epochs
    target: str = ""  # the result `to_target` counts to, in words ("" when not reached)
    to_target: tuple[float, ...] = ()  # per row: epochs that batch needs to reach it


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


def seconds_per_step(train: list[dict[str, Any]], batch: int) -> float | None:
    """Median training seconds per step between consecutive log lines at global batch `batch`
    (train_s leaves evaluation and checkpoints out)."""
    lines = [r for r in train if "train_s" in r and r.get("global_batch", batch) == batch]
    spans = [
        (b["train_s"] - a["train_s"]) / (b["step"] - a["step"])
        for a, b in zip(lines, lines[1:], strict=False)
        if b["step"] > a["step"]
    ]
    return statistics.median(spans) if spans else None


def candidates(world: int, current: int, limit: int) -> list[int]:
    """Global batches to compare: world x 2^k up to `limit` (the training set), and the run's."""
    out, b = {current}, world
    while b <= limit:
        out.add(b)
        b *= 2
    return sorted(out)


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
    step_seconds = seconds_per_step(train, gb)
    timed = [r for r in records if r.get("micro_step_seconds")]
    if estimate is None or step_seconds is None or not timed:
        return None
    micro_seconds = {int(k): v for k, v in timed[-1]["micro_step_seconds"].items()}
    if plan["micro_batch"] not in micro_seconds:
        return None
    noise, points = estimate
    t_step = max(step_seconds - plan["accumulation"] * micro_seconds[plan["micro_batch"]], 0.0)
    total = train[-1]["samples"]
    with_noise = [r for r in train if r.get("noise_scale") is not None]
    phases = []
    for fraction in PHASES:
        at = next((r for r in with_noise if r["samples"] >= fraction * total), None)
        if at is not None:
            phases.append((fraction, at["noise_scale"]))
    speed = {}
    for b in candidates(world, gb, plan["epoch_samples"]):
        timing = step_time(b, world, t_step, micro_seconds)
        if b == gb:  # as the run trained it: the measured step
            timing = (step_seconds, plan["micro_batch"])
        if timing is not None:
            speed[b] = (b / timing[0], timing[1])
    rows = tuple(
        (b, m, s, efficiency(b, noise, gb), s * efficiency(b, noise, gb) / speed[gb][0])
        for b, (s, m) in speed.items()
    )
    best = max(r[4] for r in rows)
    epoch_samples = plan["epoch_samples"]
    target, to_target = "", ()
    if reached is not None:
        target = reached[0]
        to_target = tuple(
            samples_to_match(noise, gb, reached[1], r[0]) / epoch_samples for r in rows
        )
    return Advice(
        global_batch=gb,
        world_size=world,
        noise_scale=noise,
        phases=tuple(phases),
        points=points,
        step_seconds=step_seconds,
        t_step=t_step,
        micro_seconds=micro_seconds,
        recommended=max(rows, key=lambda r: r[4])[0],
        near=tuple(r[0] for r in rows if r[4] >= 0.9 * best),
        rows=rows,
        epochs=total / epoch_samples,
        target=target,
        to_target=to_target,
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
        f"  recommended global batch: {a.recommended:,} (now {a.global_batch:,}); within 10% of "
        f"its goodput: {', '.join(f'{b:,}' for b in a.near)}",
    ]
    if a.to_target:
        lines.append(
            f"  epochs to {a.target} at each batch: this run's samples to it x (B_crit + B) / "
            f"(B_crit + {a.global_batch:,}) (E = E_min (1 + B/B_crit)); this run trained "
            f"{a.epochs:.3g}: a batch marked SHORT would not get there in as many epochs"
        )
    head = f"  {'global batch':>14} {'micro':>7} {'samples/s':>12} {'efficiency':>11} "
    lines.append(
        head + f"{'goodput vs now':>15}" + (f"{'epochs to it':>14}" if a.to_target else "")
    )
    for i, (batch, micro, speed, e, g) in enumerate(a.rows):
        mark = "  <- recommended" if batch == a.recommended else ""
        mark += "  (now)" if batch == a.global_batch else ""
        if a.to_target:
            need = a.to_target[i]
            short = " SHORT" if need > a.epochs * (1 + 1e-9) else ""
            mark = f"{need:>14.3g}{short}{mark}"
        lines.append(f"  {batch:>14,} {micro:>7,} {speed:>12,.0f} {e:>11.3f} {g:>15.3f}{mark}")
    return "\n".join(lines)


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
