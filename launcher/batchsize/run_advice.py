"""The batch-size advice a run prints at its end (and `python -m launcher.report RUN_DIR` again),
read from its folder: the advice (advice.py), its history (history.py), the next run in a
sentence."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from launcher import log
from launcher.config.optimization import OptimConfig
from launcher.config.placement import ClusterConfig
from launcher.planning.plan import BatchPlan


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
    from launcher.batchsize.advice import advise, format_advice
    from launcher.batchsize.history import format_history, probes
    from launcher.batchsize.sweep import read_job
    from launcher.planning.prior import from_records

    records = read_job(run_dir)[1]
    own = from_records(run_dir, plan.global_batch, records, target_accuracy)
    reached = (own.target, own.samples) if own is not None and own.samples else None
    advice = advise(records, dataclasses.asdict(plan), reached)
    if advice is None:
        why = "not measured" if plan.noise == "off" else "too few steps measured"
        log.info(f"batch-size advice: none (noise scale {why}; see the plan's noise_scale row)")
    else:
        log.info(format_advice(advice))
    lines = format_history(records, probes(run_dir))
    if advice is not None:
        lines.append(next_sentence(optim, cluster, advice, plan.memory.get("cap")))
    if lines:
        log.info("\n".join(lines))


def next_sentence(optim: OptimConfig, cluster: ClusterConfig, advice: Any, cap: int | None) -> str:
    """advice.next_run with the LR the plan would give the recommended batch."""
    from launcher.batchsize.advice import next_run
    from launcher.planning.rules import choose_optimizer, scale_lr

    batch = advice.recommended
    optimizer = choose_optimizer(optim, batch)[0]
    lr, rule, _ = scale_lr(optim, batch, optimizer)
    per_node = cluster.devices_per_node
    per_node = per_node if isinstance(per_node, int) else None
    return next_run(advice, lr, f"{optimizer}, the {rule} rule", cap, per_node)
