"""When a checkpoint is due. PURE: the caller brings the clock and the ranks' agreed flags.

A checkpoint is written at the run's last step, each time the consumed samples cross a multiple of
`checkpoint.every_samples`, when rank 0's clock says `checkpoint.every_minutes` have passed since
the last save (rank 0 decides for every rank, so all save the same step), and when a rank was
asked to stop (SIGUSR1/SIGUSR2/SIGTERM/SIGINT: launcher/cluster/preemption.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.types.plan import BatchPlan


@dataclass(frozen=True)
class Cadence:
    every_samples: int = 0  # 0: not by samples
    every_minutes: float = 0.0  # 0: not by time

    def late(self, seconds_since_save: float) -> bool:
        """Whether this clock says a save is due (only rank 0's is asked)."""
        return bool(self.every_minutes) and seconds_since_save >= 60 * self.every_minutes

    def due(self, plan: BatchPlan, step: int, asked: bool) -> bool:
        """Whether step `step` (1-based: just completed) ends with a checkpoint; `asked`: rank
        0's clock was late, or a rank is stopping (agreed over the ranks)."""
        if asked or step == plan.end_step:
            return True
        n = self.every_samples
        return bool(n) and plan.samples_at(step) // n > plan.samples_at(step - 1) // n
