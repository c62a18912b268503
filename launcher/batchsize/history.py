"""What happened over one run, from its metrics records: the adaptive ramp's decisions, loss
spikes, the noise scale and the critical batch over training, and branched probes of it
(launcher/cbs.py) found in the run's folder. PURE except `probes`, which reads cbs.json files.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from launcher.batchsize.advice import progress_terms

SPIKE_FACTOR = 2.0  # a logged loss this many times the median of the lines before it
SPIKE_WINDOW = 20  # ... over this many lines
SPIKE_SIGMAS = 5.0  # ... and this many robust standard deviations (1.4826 MAD) above it
DATA_WAIT = 0.1  # a run whose loop waited for data this share of its time (median) is told


def ramp_events(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The batch changes: fixed ramp-up stages and adaptive decisions (event "ramp")."""
    return [r for r in records if r.get("event") == "ramp" and "global_batch" in r]


def spikes(records: list[dict[str, Any]]) -> list[tuple[int, float, float]]:
    """(step, loss, baseline) of each training log line whose loss is not finite, or above both
    SPIKE_FACTOR x the median of the SPIKE_WINDOW lines before it and that median + SPIKE_SIGMAS
    robust standard deviations of them (late in training one step's loss varies by 2x)."""
    train = [r for r in records if "loss" in r and "event" not in r]
    found = []
    for i, r in enumerate(train):
        before = [
            x["loss"] for x in train[max(i - SPIKE_WINDOW, 0) : i] if math.isfinite(x["loss"])
        ]
        if not math.isfinite(r["loss"]):
            found.append((r["step"], r["loss"], statistics.median(before) if before else math.nan))
            continue
        if len(before) < SPIKE_WINDOW:
            continue
        median = statistics.median(before)
        sigma = 1.4826 * statistics.median(abs(x - median) for x in before)
        if r["loss"] > max(SPIKE_FACTOR * median, median + SPIKE_SIGMAS * sigma):
            found.append((r["step"], r["loss"], median))
    return found


def noise_over_training(
    records: list[dict[str, Any]], batch: int
) -> list[tuple[int, float, float]]:
    """(samples, logged B_simple, critical batch of the run up to there) per training log line
    with a logged B_simple (advice.critical_batch over the lines so far, kept as running sums)."""
    train = [r for r in records if "loss" in r and "event" not in r and "samples" in r]
    out, num, den = [], 0.0, 0.0
    for r in train:
        terms = progress_terms(r, batch)
        if terms is not None:
            num, den = num + terms[0], den + terms[1]
        if r.get("noise_scale") is not None:
            out.append((r["samples"], r["noise_scale"], num / den if den > 0 else math.nan))
    return out


def batch_over_samples(records: list[dict[str, Any]], batch: int) -> list[tuple[int, int]]:
    """(samples, global batch) at each training log line."""
    train = [r for r in records if "loss" in r and "event" not in r and "samples" in r]
    return [(r["samples"], r.get("global_batch", batch)) for r in train]


PROBE_COUNTS = ("step", "consumed_samples", "global_batch", "critical_batch")


def probes(run_dir: Path, left_out: list[str] | None = None) -> list[dict[str, Any]]:
    """The branched probes run from this run (RUN_DIR/cbs-*/cbs.json and --out folders inside
    it), oldest checkpoint first. A file that is not a probe's result is left out, and said in
    `left_out` ("PATH (why)")."""
    found = []
    for path in sorted(run_dir.glob("*/cbs.json")):
        try:
            result = json.loads(path.read_text())
            why = _probe_problem(result)
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if why is None:
            found.append(result)
        elif left_out is not None:
            left_out.append(f"{path} ({why})")
    return sorted(found, key=lambda r: r["consumed_samples"])


def _probe_problem(result: Any) -> str | None:
    """What keeps a cbs.json from being told (format_history, the plot), or None."""
    if not isinstance(result, dict):
        return "not a JSON object"
    for key in PROBE_COUNTS:
        value = result.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"{key}={value!r}: not a count"
    numbers = {"tolerance": result.get("tolerance"), "interpolated": result.get("interpolated")}
    for key, value in numbers.items():
        if value is None and key == "interpolated":
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"{key}={value!r}: not a number"
    return None


def _input_lines(records: list[dict[str, Any]]) -> list[str]:
    """The input pipeline, where the loop waited for data DATA_WAIT of its time or more (the
    median over its log intervals, the first left out: it holds the loader's start)."""
    waits = [r["data_wait"] for r in records if isinstance(r.get("data_wait"), (int, float))]
    if len(waits) < 4 or statistics.median(waits[1:]) < DATA_WAIT:  # 3 intervals at least
        return []
    share = statistics.median(waits[1:])
    return [
        f"  input pipeline: the loop waited for its micro-batches {share:.0%} of the training "
        f"time (median of {len(waits) - 1} log intervals): the data, not the model, sets the "
        "speed; more data.workers or cheaper samples would raise it (the throughput above "
        "includes these waits)"
    ]


def format_history(records: list[dict[str, Any]], found_probes: list[dict[str, Any]]) -> list[str]:
    """Lines for the advice: decisions, spikes, probes (nothing for what did not happen)."""
    lines = []
    for e in ramp_events(records):
        batch, step = e["global_batch"], e["step"]
        if "was" not in e:  # a fixed ramp-up's next stage
            lines.append(f"  ramp-up: global batch {batch} from step {step:,}")
            continue
        why = f", measured noise scale {e['noise_scale']:,.0f}" if "noise_scale" in e else ""
        where = f" (sample {e['samples']:,})" if "samples" in e else ""
        lines.append(f"  ramp: global batch {e['was']} -> {batch} at step {step:,}{where}{why}")
    found = spikes(records)
    if found:
        shown = "; ".join(f"step {s:,}: {loss:.4g} vs {base:.4g}" for s, loss, base in found[:5])
        more = f" (and {len(found) - 5} more)" if len(found) > 5 else ""
        lines.append(
            f"  loss spikes: {len(found)} log line(s) above {SPIKE_FACTOR:g}x and "
            f"{SPIKE_SIGMAS:g} robust sigmas over the median of the {SPIKE_WINDOW} before them, "
            f"or not finite: {shown}{more}"
        )
    lines += _health_lines(records)
    lines += _input_lines(records)
    for p in found_probes:
        crossed = p.get("interpolated")
        lines.append(
            f"  branched probe at step {p['step']:,} ({p['consumed_samples']:,} samples): "
            f"critical batch {p['critical_batch']:,} (largest k x {p['global_batch']} within "
            f"{p['tolerance']:.1%} of the k=1 branch's eval loss"
            + (f", crossing at ~{crossed:,.0f}" if crossed else "")
            + ")"
        )
    return lines


def _health_lines(records: list[dict[str, Any]]) -> list[str]:
    """The steps the run's health check flagged (launcher/training/guard.py): non-finite ones
    (skipped) and loss spikes (skipped under trainer.skip_spikes)."""
    lines = []
    for kind, what in (("non_finite", "non-finite step(s)"), ("loss_spike", "loss spike(s)")):
        found = [e for e in records if e.get("event") == kind]
        if not found:
            continue
        steps = ", ".join(f"{e['step']:,}" for e in found[:8]) + (" ..." if found[8:] else "")
        skipped = sum(1 for e in found if e.get("skipped"))
        lines.append(
            f"  {what}: {len(found)} at step(s) {steps}; {skipped} skipped (not learned from)"
        )
    return lines
