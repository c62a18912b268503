"""After every step: a checkpoint when one is due (launcher/checkpoint/cadence.py), and a stop at
the step boundary when a rank was signalled (launcher/cluster/preemption.py). The Checkpointer owns
the clock of the time cadence; rank 0's clock decides for every rank."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from launcher import faults, log
from launcher.batchsize.meter import NoiseMeter
from launcher.checkpoint import files as checkpoint
from launcher.checkpoint import resume
from launcher.checkpoint.cadence import Cadence
from launcher.checkpoint.paths import WriteFailed
from launcher.cluster import preemption
from launcher.config.capabilities import capabilities
from launcher.config.schema import RunConfig
from launcher.data.stream import Snapshots
from launcher.errors import ConfigError
from launcher.training.guard import Diverged, Health, params_finite, state_message
from launcher.training.metrics import MetricsSink
from launcher.types.bundles import Trainee
from launcher.types.plan import BatchPlan
from launcher.types.state import Progress


class Checkpointer:
    """`after_step(step, plan)`, the loop's hook: save when due, then stop if asked to."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        t: Trainee,
        sink: MetricsSink,
        meter: NoiseMeter | None,
        health: Health | None = None,
        snapshots: Snapshots | None = None,
    ) -> None:
        self.cfg, self.run_dir, self.t, self.sink, self.meter = cfg, run_dir, t, sink, meter
        self.health = health  # guard.Health: its loss at the start goes into the checkpoint
        self.snapshots = snapshots  # a stream's saved places (launcher/data/stream.py)
        self.compared = False  # the ranks' streams compared at this process's first step
        self.main = t.backend.rank == 0
        c = cfg.checkpoint
        self.cadence = Cadence(c.every_samples, c.every_minutes)
        self.last_save = time.monotonic()
        self.sharded = capabilities(cfg.backend).sharded_checkpoints

    def after_step(self, step: int, plan: BatchPlan) -> None:
        if not self.compared:
            self.compared = True
            self.same_stream(step, plan)
        faults.test_kill(step, "step")
        late = self.main and self.cadence.late(time.monotonic() - self.last_save)
        bits = 0
        for flag in self.t.backend.flags(int(late) | preemption.received()):
            bits |= flag  # bit 0: rank 0's clock; the others: signals, from any rank
        stop = [] if step == plan.end_step else preemption.signals(bits)
        path = None
        if self.cadence.due(plan, step, bool(bits & 1) or bool(stop)) and plan.checkpoints:
            path = self.save(step, plan)
        if stop:
            self.sink.log({"event": "stopped", "step": step, "signals": [s.name for s in stop]})
            message = preempted_message(stop, step, plan, path, self.main)
            faults.test_kill(step, "stopping")
            raise preemption.Stopped(message)

    def same_stream(self, step: int, plan: BatchPlan) -> None:
        """Every rank read the same stream: the digests of the sample at this step's end
        (launcher/data/stream.py snapshots; -1 where there is none, as for map-style data)."""
        if self.snapshots is None or self.t.backend.world_size == 1:
            return
        position = plan.samples_at(step)
        place = self.snapshots.at(position)
        every = self.t.backend.flags(place["digest"] if place is not None else -1)
        if len(set(every)) > 1:
            raise ConfigError(
                f"data: the training stream differs between ranks at sample {position:,} "
                f"(digests by rank: {every}); every rank must read the same stream, of which the "
                "launcher gives each its share (do not split it by rank yourself)"
            )

    def save(self, step: int, plan: BatchPlan) -> Path | None:
        """Every rank's part of the state; rank 0 writes it. Never a non-finite checkpoint.
        The ranks' streams are compared first."""
        self.same_stream(step, plan)
        t = self.t
        if any(t.backend.flags(int(not params_finite(t.model)))):
            raise Diverged(state_message(step, "checkpoint"))
        self.sink.pause()  # saving is not training time
        measured: Progress = {"train_s": self.sink.train_seconds()}
        if self.meter is not None:
            self.meter.flush()
            measured["noise"] = self.meter.state_dict()
        if self.health is not None and self.health.start is not None:
            measured["loss_start"] = self.health.start
        snapshot = self.snapshots.at(plan.samples_at(step)) if self.snapshots else None
        if snapshot is not None:  # the stream's place: resume loads it instead of re-reading
            measured["stream"] = snapshot
        manifest = self._write_shards(step) if self.sharded else None
        state = resume.capture(
            self.cfg, plan, step, t.backend, t.model, t.optimizer, measured, whole=not self.sharded
        )
        path = None
        if self.main:
            assert state is not None  # capture gives rank 0 the state
            path = checkpoint.save(self.run_dir, step, state, self.cfg.checkpoint.keep, manifest)
            self.sink.log({"event": "checkpoint", "step": step, "path": str(path)})
        self.last_save = time.monotonic()
        self.sink.resume()
        return path

    def _write_shards(self, step: int) -> dict[str, list[Any]] | None:
        """Every rank's shards into the checkpoint's temporary folder; rank 0 gets the manifest.
        A rank that cannot write makes every rank fail: WriteFailed, the folder removed."""
        where = checkpoint.shards_tmp(self.run_dir, step)
        try:
            return self.t.backend.save_shards(self.t.model, self.t.optimizer, where)
        except OSError as exc:  # on any rank: every rank gets it
            if self.main:
                shutil.rmtree(where, ignore_errors=True)
            before = checkpoint.checkpoints(self.run_dir)
            kept = f"; the previous one, {before[0]}, is intact" if before else "; none before"
            raise WriteFailed("checkpoint shards", where, exc, kept) from None


def preempted_message(
    stop: list[Any], step: int, plan: BatchPlan, path: Path | None, main: bool
) -> str:
    """What happened on a SIGUSR1/SIGTERM; rank 0 requeues the Slurm job on SIGUSR1."""
    stop = sorted(set(stop) | set(preemption.signals(preemption.received())))  # also mid-save
    names = " and ".join(s.name for s in stop)
    head = f"launcher: stopped by {names} after step {step:,} of {plan.steps:,}"
    if not plan.checkpoints:
        return f"{head}: checkpoints are off, nothing saved, not requeued (see the plan)"
    if any(sig in stop for sig in preemption.STOPS):  # scancel, Ctrl-C, or a scheduler
        return f"{head}; checkpoint {path}; rerun the same command (resume=auto) to continue"
    if not main:
        return head
    job = os.environ.get("SLURM_JOB_ID")
    if job:  # Slurm kills the job within ~0.1 s of the requeue: say it first
        log.warn(f"{head}; checkpoint {path}; requeueing Slurm job {job}")
    return f"{head}; checkpoint {path}; {preemption.requeue()}"
