"""What the readers of a run's folder (the advice, the sweep report, launcher.cbs, the plan's
budget row) may assume of its plan.json and metrics.jsonl records, checked once where they are
read (sweep.read_job): a field they use has the type the launcher writes, so a file that is JSON
but not a run's (edited, truncated into another shape, another program's) is one line of bad
input, never a TypeError deep in a computation. PURE.

A number the launcher wrote may be null (metrics.jsonl writes a non-finite value as null).
"""

from __future__ import annotations

from typing import Any

COUNTS = ("step", "samples")  # integers >= 0
NUMBERS = (  # numbers or null
    "loss",
    "lr",
    "epoch",
    "samples_per_s",
    "train_s",
    "eval_loss",
    "eval_accuracy",
    "eval_samples",
    "grad_sq",
    "grad_trace",
    "noise_scale",
    "data_wait",
    "padding_fraction",
)
PLAN_INTS = ("global_batch", "world_size", "micro_batch", "accumulation", "epoch_samples", "steps")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _count(value: Any, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _timings(value: Any, each: Any) -> bool:
    """{"<micro-batch>": each(value)} with positive integer keys."""
    return isinstance(value, dict) and all(
        isinstance(k, str) and k.isdigit() and int(k) > 0 and each(v) for k, v in value.items()
    )


def _seconds(value: Any) -> bool:
    return _number(value) and value >= 0


def _repeats(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_seconds(v) for v in value)


def record_problem(record: dict[str, Any]) -> str | None:
    """What is wrong with one metrics record, in words ("loss='x': not a number"), or None."""
    for key in COUNTS:
        if key in record and not _count(record[key]):
            return f"{key}={record[key]!r}: not a count"
    for key in NUMBERS:
        value = record.get(key)
        if value is not None and not _number(value):
            return f"{key}={value!r}: not a number"
    batch = record.get("global_batch")
    if batch is not None and not _count(batch, 1):
        return f"global_batch={batch!r}: not a positive integer"
    if "event" in record and not isinstance(record["event"], str):
        return f"event={record['event']!r}: not a name"
    if record.get("event") == "ramp" and "was" in record and not _count(record["was"]):
        return f"was={record['was']!r}: not a batch"
    if "micro_step_seconds" in record and not _timings(record["micro_step_seconds"], _seconds):
        return "micro_step_seconds: not {micro-batch: seconds}"
    if "micro_step_repeats" in record and not _timings(record["micro_step_repeats"], _repeats):
        return "micro_step_repeats: not {micro-batch: [seconds, ...]}"
    if "final" in record and not isinstance(record["final"], bool):
        return f"final={record['final']!r}: not true or false"
    return None


def plan_problem(plan: Any) -> str | None:
    """What is wrong with a plan.json's content for its readers, or None. Only global_batch is
    required (older plans lack the rest); the others, where present, are positive integers."""
    if not isinstance(plan, dict):
        return "not a JSON object"
    if "global_batch" not in plan:
        return "no integer global_batch"
    for key in PLAN_INTS:
        value = plan.get(key)
        if key in plan and not _count(value, 1):
            return f"{key}={value!r}: not a positive integer"
    if plan.get("lr") is not None and not _number(plan["lr"]):
        return f"lr={plan['lr']!r}: not a number"
    memory = plan.get("memory")
    if memory is not None and not isinstance(memory, dict):
        return f"memory={memory!r}: not an object"
    cap = (memory or {}).get("cap")
    if cap is not None and not _count(cap, 1):
        return f"memory.cap={cap!r}: not a positive integer"
    return None
