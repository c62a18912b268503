"""Which global batch is worth it, from what a run measured (its metrics.jsonl). PURE.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training"): the steps S and samples E
to reach a given loss follow S = S_min (1 + B_crit/B) and E = E_min (1 + B/B_crit), with the
critical batch B_crit close to the gradient noise scale, whose measurable form is
B_simple = tr(Sigma)/|G|^2 (launcher/noise.py). Below B_crit a bigger batch buys fewer steps
almost for free; far above it, it only spends more samples.

Pollux (Qiao et al., OSDI'21): goodput(B) = throughput(B) x efficiency(B), with the statistical
efficiency efficiency(B) = (phi + B0)/(phi + B) for noise scale phi: the progress one sample makes
at batch B relative to batch B0 (here B0 = the run's batch, so "vs now" is a plain ratio).

Throughput model, from the run's own timing (launcher/metrics.PhaseClock): a step of global batch
B on W ranks takes t_step + (B/W) t_sample, t_sample the micro-step seconds per sample on a rank
(forward, backward, loading; measured at the plan's micro-batch) and t_step the rest (all-reduce,
optimizer, bookkeeping). Goodput B/((t_step + B t_sample/W)(phi + B)) is then largest at
B* = sqrt(phi W t_step / t_sample). Assumed: the per-sample time does not depend on the
micro-batch (small micro-batches are usually slower per sample, so a recommendation below the
current batch is optimistic) and the memory cap is met by accumulation at the same cost.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

PHASES = (0.1, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Advice:
    global_batch: int
    world_size: int
    noise_scale: float  # B_crit of the run: critical_batch()
    phases: tuple[tuple[float, float], ...]  # (fraction of the run's samples, B_simple there)
    points: int  # log lines the run estimate averages
    samples_per_s: float  # measured at the run's batch (evaluation excluded)
    t_sample: float  # micro-step seconds per sample per rank
    t_step: float  # seconds per step outside the micro-steps
    best: float  # B*, the goodput optimum of the model
    recommended: int  # the candidate batch with the highest goodput
    rows: tuple[tuple[int, float, float, float], ...]  # (B, samples/s, efficiency, goodput vs now)


def efficiency(batch: float, noise: float, base: float) -> float:
    """Progress per sample at `batch` relative to `base` (Pollux)."""
    return (noise + base) / (noise + batch)


def throughput(batch: float, world: int, t_sample: float, t_step: float) -> float:
    """Samples per second of the timing model at global batch `batch` on `world` ranks."""
    return batch / (t_step + batch / world * t_sample)


def critical_batch(records: list[dict], batch: int) -> tuple[float, int] | None:
    """(B_crit, points): the noise scale averaged over a run the way a fixed batch meets it.

    Each log line's B_simple (the EMA estimates' ratio) is phi_t. In the empirical model a step at
    batch B makes 1/(1 + phi_t/B) steps' worth of progress at the minimal step count, so over a
    whole run S(B) = S_min (1 + B_crit/B) with B_crit the mean of phi_t weighted by that progress,
    w_t = 1/(1 + phi_t/B_t), B_t the batch the line was trained at. Lines without an estimate
    (before |G|^2 > 0) are left out.
    """
    pairs = [
        (r["noise_scale"], r.get("global_batch", batch))
        for r in records
        if r.get("noise_scale") is not None and r["noise_scale"] > 0
    ]
    if not pairs:
        return None
    weights = [1 / (1 + phi / b) for phi, b in pairs]
    value = sum(w * phi for w, (phi, _) in zip(weights, pairs, strict=True)) / sum(weights)
    return value, len(pairs)


def candidates(world: int, current: int, limit: int) -> list[int]:
    """Global batches to compare: world x 2^k up to `limit` (the training set), and the run's."""
    out, b = {current}, world
    while b <= limit:
        out.add(b)
        b *= 2
    return sorted(out)


def advise(records: list[dict], plan: dict) -> Advice | None:
    """The advice from a run's metrics lines and its plan.json; None without a noise scale or
    timing (trainer.noise_scale=false, backend=deepspeed, or too short a run)."""
    train = [r for r in records if "loss" in r]
    estimate = critical_batch(train, plan["global_batch"])
    timed = [r for r in train if "sample_compute_s" in r]
    if estimate is None or not timed:
        return None
    noise, points = estimate
    gb, world = plan["global_batch"], plan["world_size"]
    t_sample = statistics.median(r["sample_compute_s"] for r in timed)
    t_step = statistics.median(r["step_overhead_s"] for r in timed)
    total = train[-1]["samples"]
    with_noise = [r for r in train if r.get("noise_scale") is not None]
    phases = []
    for fraction in PHASES:
        at = next((r for r in with_noise if r["samples"] >= fraction * total), None)
        if at is not None:
            phases.append((fraction, at["noise_scale"]))
    best = math.sqrt(noise * world * t_step / t_sample)
    now = throughput(gb, world, t_sample, t_step)
    rows = []
    for b in candidates(world, gb, plan["epoch_samples"]):
        speed = throughput(b, world, t_sample, t_step)
        e = efficiency(b, noise, gb)
        rows.append((b, speed, e, speed * e / now))
    recommended = max(rows, key=lambda r: r[3])[0]
    return Advice(
        global_batch=gb,
        world_size=world,
        noise_scale=noise,
        phases=tuple(phases),
        points=points,
        samples_per_s=train[-1]["samples_per_s"],
        t_sample=t_sample,
        t_step=t_step,
        best=best,
        recommended=recommended,
        rows=tuple(rows),
    )


def format_advice(a: Advice) -> str:
    """The advice, with the numbers that led to it."""
    over = ", ".join(f"{v:,.0f} at {f:.0%}" for f, v in a.phases)
    b = a.noise_scale
    lines = [
        "batch-size advice (McCandlish et al. 2018; Pollux, Qiao et al. 2021)",
        f"  gradient noise scale B_simple = tr(Sigma)/|G|^2 at these fractions of the run's "
        f"samples: {over} (it grows as the loss falls)",
        f"  critical batch of the run ~ {b:,.0f}: B_simple averaged over {a.points} log points, "
        "each weighted by the progress a step makes there, 1/(1 + B_simple/B); steps to the "
        "same result ~ S_min (1 + B_crit/B): below it a bigger batch nearly halves the steps, "
        "far above it the steps barely drop and the extra samples are spent",
        f"  throughput now: {a.samples_per_s:,.0f} samples/s at global batch {a.global_batch:,} "
        f"(measured, evaluation excluded); model: {a.t_step * 1e3:.3g} ms per step + "
        f"{a.t_sample * 1e6:.3g} us per sample on each of {a.world_size} rank(s)",
        f"  goodput = samples/s x efficiency, efficiency = ({b:,.0f} + {a.global_batch:,}) / "
        f"({b:,.0f} + B); optimum B* = sqrt(noise x ranks x t_step / t_sample) = "
        f"sqrt({b:,.0f} x {a.world_size} x {a.t_step:.3g} s / {a.t_sample:.3g} s) = {a.best:,.0f}",
        f"  recommended global batch: {a.recommended:,} (now {a.global_batch:,})",
        f"  {'global batch':>14} {'samples/s':>12} {'efficiency':>11} {'goodput vs now':>15}",
    ]
    for batch, speed, e, g in a.rows:
        mark = "  <- recommended" if batch == a.recommended else ""
        mark += "  (now)" if batch == a.global_batch else ""
        lines.append(f"  {batch:>14,} {speed:>12,.0f} {e:>11.3f} {g:>15.3f}{mark}")
    return "\n".join(lines)
