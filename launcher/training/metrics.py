"""Rank-0 outputs of a run: metrics.jsonl, TensorBoard event files, the progress bar, and the
opt-in trackers (Weights & Biases, MLflow) through Accelerate's tracker classes."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from launcher.checkpoint.paths import WriteFailed
from launcher.config.schema import RunConfig, to_dict
from launcher.errors import ConfigError

if TYPE_CHECKING:  # both load when they are asked for (trainer.tensorboard, trainer.progress)
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

TRACKER_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}  # trainer.trackers -> module to import


def check_trackers(trackers: tuple[str, ...]) -> None:
    """Refuse a tracker whose package is not installed (before anything is written)."""
    for name in trackers:
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise ConfigError(
                f"trainer.trackers={list(trackers)}: {name} is not installed; "
                f"pip install {'mlflow-skinny' if name == 'mlflow' else name}, or leave it out "
                "(TensorBoard needs nothing)"
            )


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[prefix + key] = value
        else:
            out[prefix + key] = str(value)
    return out


def open_trackers(cfg: RunConfig, run_dir: Path, plan: dict[str, Any]) -> list[Any]:
    """Accelerate's trackers named in trainer.trackers, started, with the config and the plan's
    numbers stored as the run's parameters. W&B: project launcher-<recipe> (WANDB_PROJECT wins),
    files under the run directory; MLflow: experiment launcher-<recipe> (MLFLOW_EXPERIMENT_NAME
    wins) at MLFLOW_TRACKING_URI. Both: run name = the run directory's name."""
    from accelerate.tracking import MLflowTracker, WandBTracker

    default = f"launcher-{cfg.recipe}"
    trackers = []
    for name in cfg.trainer.trackers:
        if name == "wandb":
            project = os.environ.get("WANDB_PROJECT", default)
            tracker = WandBTracker(project, name=run_dir.name, dir=str(run_dir))
        else:  # accelerate reads MLFLOW_EXPERIMENT_NAME itself
            tracker = MLflowTracker(experiment_name=default, run_name=run_dir.name)
        tracker.start()
        scalars = {k: v for k, v in plan.items() if isinstance(v, (int, float, str))}
        tracker.store_init_configuration(_flat(to_dict(cfg)) | _flat(scalars, "plan."))
        trackers.append(tracker)
    return trackers


TAG_GROUPS = {
    "train": ("loss", "lr", "epoch", "global_batch"),
    "noise": ("grad_sq", "grad_trace", "noise_scale"),
    "speed": ("samples_per_s", "train_s"),
    "memory": ("cuda_peak_bytes", "micro_batch", "accumulation"),
}


def tensorboard_tag(key: str) -> str:
    """The TensorBoard tag of a metrics field: eval/..., train/..., noise/..., speed/...,
    memory/..., else run/<key>."""
    if key.startswith("eval_"):
        return f"eval/{key.removeprefix('eval_')}"
    group = next((g for g, keys in TAG_GROUPS.items() if key in keys), "run")
    return f"{group}/{key}"


def _quiet_writer_thread() -> None:
    """TensorBoard's writer thread keeps an OSError for the main thread (which raises it at the
    next write: one line, _written) and also lets it reach threading's hook, which would print
    a traceback first: not that one."""
    import threading

    previous = threading.excepthook
    if getattr(previous, "launcher", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        writer = type(args.thread).__name__ == "_AsyncWriterThread"
        if not (writer and args.exc_type is not None and issubclass(args.exc_type, OSError)):
            previous(args)

    hook.launcher = True  # type: ignore[attr-defined]
    threading.excepthook = hook


@contextmanager
def _written(what: str, path: str) -> Iterator[None]:
    """An OSError of a write (a full disk) as paths.WriteFailed: one line, exit 5."""
    try:
        yield
    except OSError as exc:
        raise WriteFailed(what, path, exc) from None


def finite_or_none(record: dict[str, Any]) -> dict[str, Any]:
    """A record with non-finite numbers as None (null in JSON, nothing in TensorBoard)."""
    return {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()
    }


def _add_scalars(writer: SummaryWriter, tags: dict[str, float], x: int) -> None:
    """The line's scalars as one TensorBoard event at x, each as add_scalar writes it (a
    Summary value with `simple_value`): one event and one queue item per line instead of one
    per scalar (add_scalar costs ~43 us each here, its writer thread's work included)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    values = [Summary.Value(tag=tag, simple_value=float(v)) for tag, v in tags.items()]
    file_writer: Any = writer._get_file_writer()  # type: ignore[no-untyped-call]  # add_scalar's
    file_writer.add_summary(Summary(value=values), global_step=x)


class MetricsSink:
    """Writes what the loop reports. On ranks other than 0 every method does nothing. A restart
    at `resume_step` drops the lines and TensorBoard events of later steps (the checkpoint it
    continues from had not seen them)."""

    def __init__(
        self,
        run_dir: Path | None,
        *,
        total_steps: int,
        tensorboard: bool,
        progress: bool,
        resume_step: int = 0,
        resume_samples: int = 0,
        train_s: float = 0.0,
        trackers: list[Any] | None = None,
    ) -> None:
        self.enabled = run_dir is not None
        self._file: TextIO | None = None
        self._tb: SummaryWriter | None = None
        self._bar: tqdm[Any] | None = None
        self._trackers = trackers or []
        self._t0 = time.perf_counter()
        self._train_s0 = train_s  # training seconds before this process (a resumed run)
        self._excluded = 0.0  # seconds of evaluation and checkpoints since `start`
        self._paused_at: float | None = None
        if run_dir is None:  # not rank 0
            return
        path = run_dir / "metrics.jsonl"
        if path.exists():  # a restart: keep what the checkpoint it continues from had seen
            kept = [
                line
                for line in path.read_text().splitlines(keepends=True)
                if line.endswith("\n") and json.loads(line).get("step", 0) <= resume_step
            ]
            path.write_text("".join(kept))
        self._file = open(path, "a", buffering=1)  # noqa: SIM115
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_writer_thread()

            self._tb = SummaryWriter(  # its x axis is samples (tensorboard_tag)
                log_dir=str(run_dir / "tensorboard"), purge_step=resume_samples + 1
            )
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, leave=True)

    def start(self, step: int) -> None:
        """Mark where timing starts (the first step of this process)."""
        self._t0, self._excluded = time.perf_counter(), 0.0
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def pause(self) -> None:
        """Evaluation or a checkpoint starts: not training time (`resume` ends it)."""
        self._paused_at = time.perf_counter()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._excluded += time.perf_counter() - self._paused_at
            self._paused_at = None

    def _training_seconds(self) -> float:
        """Seconds of training in this process since `start` (no evaluation, no checkpoints)."""
        now = time.perf_counter() if self._paused_at is None else self._paused_at
        return now - self._t0 - self._excluded

    def train_seconds(self) -> float:
        """Training seconds of the whole run, also those before a resume (time-to-target)."""
        return self._train_s0 + self._training_seconds()

    def samples_per_second(self, samples: int) -> float:
        """Throughput of `samples` trained since `start` (evaluation time left out)."""
        elapsed = self._training_seconds()
        return samples / elapsed if elapsed > 0 else 0.0

    def log(self, record: dict[str, Any]) -> None:
        """One line in metrics.jsonl; numeric fields of a line with `samples` also go to
        TensorBoard at x = samples, grouped by tensorboard_tag (runs at different global batches
        line up); trackers get them at `step`."""
        if self._file is None:  # not rank 0
            return
        record = finite_or_none(record)  # valid JSON always: a non-finite number is null
        with _written("metrics", self._file.name):
            self._file.write(json.dumps(record, allow_nan=False) + "\n")
        scalars = {
            k: v
            for k, v in record.items()
            if k not in ("step", "samples") and isinstance(v, (int, float)) and "step" in record
        }
        if self._tb is not None and "samples" in record:
            tags = {tensorboard_tag(key): value for key, value in scalars.items()}
            if "loss" in record:
                tags["train/step"] = record["step"]
            with _written("TensorBoard events in", self._tb.log_dir):  # its thread's error too
                _add_scalars(self._tb, tags, record["samples"])
        if scalars:
            for tracker in self._trackers:
                tracker.log(scalars, step=record["step"])
        if self._bar is not None and "loss" in record:
            self._bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                lr=f"{record['lr']:.4g}",
                samples_s=f"{record.get('samples_per_s', 0):,.0f}",
                refresh=False,
            )
        if self._bar is not None and "eval_accuracy" in record:
            self._bar.write(
                f"step {record['step']}: eval accuracy {record['eval_accuracy']:.4f}, "
                f"eval loss {record['eval_loss']:.4f}"
            )

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        for tracker in self._trackers:
            tracker.finish()
        try:  # both closed whatever happens to the other; a full disk is said as one line
            if self._tb is not None:
                with _written("TensorBoard events in", self._tb.log_dir):
                    self._tb.close()
        finally:
            if self._file is not None:
                with _written("metrics", self._file.name):
                    self._file.close()
