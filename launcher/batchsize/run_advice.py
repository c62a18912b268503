"""The batch-size advice a run prints at its end (and `python -m launcher.report RUN_DIR` again),
read from its folder: the advice (advice.py), its history (history.py), the next run in a
sentence."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from launcher import log
from launcher.batchsize.advice import advise, format_advice, next_run
from launcher.batchsize.history import format_history, probes
from launcher.batchsize.outcome import why_not_learned
from launcher.config.optimization import OptimConfig
from launcher.config.placement import ClusterConfig
from launcher.planning.rules import choose_optimizer, scale_lr
from launcher.types.plan import BatchPlan


def print_advice(
    run_dir: Path,
    plan: BatchPlan,
    target_accuracy: float | None,
    optim: OptimConfig,
    cluster: ClusterConfig,
) -> None:
    """The batch-size advice from the run's metrics (launcher/batchsize/advice.py), or why there is
    none; the run's ramp decisions, loss spikes and branched probes (launcher/batchsize/history.py);
    the next run in a sentence."""
    from launcher.batchsize.sweep import read_job  # heavy: numpy

    records = read_job(run_dir)[1]
    advice, why = advice_or_why(run_dir, records, dataclasses.asdict(plan), target_accuracy)
    log.info(f"batch-size advice: none ({why})" if advice is None else format_advice(advice))
    lines = format_history(records, probes(run_dir))
    if advice is not None:
        lines.append(next_sentence(optim, cluster, advice, plan.memory.get("cap")))
    if lines:
        log.info("\n".join(lines))


def advice_or_why(
    run_dir: Path, records: list[dict[str, Any]], plan: dict[str, Any], target: float | None
) -> tuple[Any, str]:
    """(the run's Advice, "") or (None, why it has none): it diverged or did not learn
    (outcome.py), or it measured no noise scale or too few timed steps. `target`: the eval
    accuracy the epochs-to-target column counts to (None: the run's own final eval loss)."""
    from launcher.batchsize.prior import from_records  # heavy: numpy

    failed = why_not_learned(records)
    if failed is not None:
        return None, failed
    own = from_records(run_dir, plan["global_batch"], records, target)
    reached = (own.target, own.samples) if own is not None and own.samples else None
    advice = advise(records, plan, reached)
    if advice is not None:
        return advice, ""
    if plan.get("noise") == "off":
        return None, "the noise scale was not measured; see the plan's noise_scale row"
    return None, "too few steps measured for the noise scale and the step timings"


def next_sentence(optim: OptimConfig, cluster: ClusterConfig, advice: Any, cap: int | None) -> str:
    """advice.next_run with the LR the plan would give the recommended batch."""
    batch = advice.recommended
    optimizer = choose_optimizer(optim, batch)[0]
    lr, rule, _ = scale_lr(optim, batch, optimizer)
    per_node = cluster.devices_per_node
    devices = per_node if isinstance(per_node, int) else None
    return next_run(advice, lr, f"{optimizer}, the {rule} rule", cap, devices)
