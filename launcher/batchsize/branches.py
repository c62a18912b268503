"""The branched critical-batch probe's arithmetic and its table (launcher/cbs.py runs the
branches): where the branches' eval-loss gap to the k=1 branch crosses the tolerance. PURE."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Crossing:
    """What the branches say: gaps per k, the largest batch within tolerance, the crossing."""

    gaps: tuple[float, ...]  # (loss_k - loss_1) / loss_1; inf for a non-finite loss
    largest: int  # the largest k x B within tolerance (every smaller k within too)
    interpolated: float | None  # where the gap crosses the tolerance; None: never crossed


def crossing(batch: int, ks: list[int], losses: list[float], tolerance: float) -> Crossing:
    """PURE. `ks` ascending from 1, `losses` the branches' final eval losses."""
    if not ks or ks[0] != 1 or sorted(set(ks)) != ks or len(ks) != len(losses):
        raise ValueError(f"crossing: ks must ascend from 1 (got {ks}) with one loss each")
    base = losses[0]
    if not math.isfinite(base) or base == 0:
        raise ValueError(f"crossing: the k=1 branch's loss {base} is not a finite nonzero value")
    gaps = tuple((x - base) / abs(base) if math.isfinite(x) else math.inf for x in losses)
    last = 0
    while last + 1 < len(ks) and gaps[last + 1] <= tolerance:
        last += 1
    interpolated = None
    if last + 1 < len(ks):
        g0, g1 = gaps[last], gaps[last + 1]
        k0, k1 = math.log(ks[last]), math.log(ks[last + 1])
        frac = 1.0 if math.isinf(g1) else (tolerance - g0) / (g1 - g0)
        interpolated = batch * math.exp(k0 + frac * (k1 - k0))
    return Crossing(gaps, batch * ks[last], interpolated)


def format_result(r: dict[str, Any]) -> str:
    """The branches as a table, then the critical batch and the noise scale beside it."""
    lines = [
        f"critical batch, measured by branching (Merrill et al. 2025) from {r['checkpoint']} "
        f"(step {r['step']:,}, {r['consumed_samples']:,} samples, global batch "
        f"{r['global_batch']:,}): each branch trains the next {r['branch_samples']:,} samples",
        f"  {'k':>4} {'global batch':>13} {'lr':>10} {'eval loss':>10} {'gap':>8}",
    ]
    for b in r["branches"]:
        mark = "" if b["gap"] <= r["tolerance"] else "  > tolerance"
        mark += "  (diverged)" if b.get("diverged") else ""
        lines.append(
            f"  {b['k']:>4} {b['global_batch']:>13,} {b['lr']:>10.4g} {b['eval_loss']:>10.4f} "
            f"{b['gap']:>+8.2%}{mark}"
        )
    crossed = r["interpolated"]
    where = (
        f"; the gap crosses {r['tolerance']:.1%} at ~{crossed:,.0f} (log-linear in k)"
        if crossed is not None
        else f"; every branch stayed within {r['tolerance']:.1%}: it is at least this"
    )
    lines.append(
        f"  critical batch here: {r['critical_batch']:,} (the largest k x B within "
        f"{r['tolerance']:.1%} of k=1's eval loss){where}"
    )
    at, run = r["noise_scale_at_checkpoint"], r["run_critical_batch"]
    lines.append(
        "  noise scale beside it: B_simple "
        + (f"{at:,.0f}" if at is not None else "not logged")
        + " at the checkpoint, the run's critical batch up to it "
        + (f"{run:,.0f}" if run is not None else "not measured")
        + f"; the branches trained {r['samples_trained']:,} samples in all"
    )
    return "\n".join(lines)
