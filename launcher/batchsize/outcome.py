"""Whether a run learned, from its metrics records: batch-size advice (the end of a run,
`python -m launcher.report`, a sweep's fit and recommendations) is given only from runs that did.
A run that diverged or did not learn measured a noise scale and a throughput of training that
failed; a batch chosen from them is a guess. PURE.

- diverged: a `diverged` event (the loop stopped the run), or its last evaluation's loss is not
  finite (null in metrics.jsonl);
- did not learn: its last evaluation's loss is not below the loss it started from (the first
  finite logged training loss) by LEARNED_MARGIN of that loss. The first logged loss is that of the
  first log step (trainer.log_every), before most of the warmup; an evaluation's loss is on
  held-out data, which an untrained model scores about as it scores its training batch (MNIST-1D
  at lr 1e-9: 2.2985 at step 10, 2.3032 at the end).

What it does not catch: a run whose loss falls by more than the margin and whose predictions are
still useless (it learned the class frequencies only, or its eval loss is far above what the
workload reaches); a run that learned within its first log interval and then stood still reads
as one that did not learn.
"""

from __future__ import annotations

import math
from typing import Any

LEARNED_MARGIN = 0.01  # the final eval loss must be this share of the first loss below it


def _at(record: dict[str, Any]) -> str:
    step = record.get("step")
    return f"step {step:,}" if isinstance(step, int) else "an unnamed step"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def why_not_learned(records: list[dict[str, Any]]) -> str | None:
    """None when the run learned; else why not, as a clause ("the run diverged at step 63:
    ..."); also when its records cannot tell (no evaluation, no training loss)."""
    diverged = next((r for r in records if r.get("event") == "diverged"), None)
    if diverged is not None:
        why = f": {diverged['why']}" if diverged.get("why") else ""
        return f"the run diverged at {_at(diverged)}{why}"
    evals = [r for r in records if "eval_loss" in r and "event" not in r]
    if not evals:
        return "the run has no evaluation to tell whether it learned"
    final = evals[-1]
    if not _finite(final["eval_loss"]):
        return f"the run diverged: its eval loss at {_at(final)} is not finite"
    train = (r for r in records if "loss" in r and "event" not in r)
    first = next((r for r in train if _finite(r["loss"])), None)
    if first is None:
        return "the run logged no finite training loss to tell whether it learned"
    start, end = first["loss"], final["eval_loss"]
    if end < start - LEARNED_MARGIN * abs(start):
        return None
    return (
        f"the run did not learn: its final eval loss {end:.4g} is not {LEARNED_MARGIN:.0%} or more "
        "below "
        f"the loss it started from ({start:.4g} at {_at(first)})"
    )
