"""Where a job's run goes: its folder's default name (the launch time, the Slurm job's or the
elastic run's, so a requeued or restarted job finds its run again), whether an existing one is
used as it is, making it, and the plan files written into it (config.yaml, plan.json, DeepSpeed's
ds_config.json)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path

from launcher.backends import write_config
from launcher.config.schema import RunConfig, to_dict
from launcher.errors import ConfigError
from launcher.types.plan import BatchPlan

RUN_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")  # torchrun --rdzv-id, in a folder name


def job_run_dir(run_dir: str | None, recipe: str, stamp: str, job: int | None) -> Path:
    """run_dir, or outputs/<recipe>/<stamp>; in a sweep (job set) one numbered folder per job."""
    if job is None:
        return Path(run_dir or Path("outputs") / recipe / stamp)
    return Path(run_dir or Path("outputs") / recipe / f"multirun-{stamp}") / str(job)


def run_stamp() -> str:
    """The default run folder's name: slurm-<job id> under Slurm (a requeued job finds its run
    again and resumes), torchrun-<rendezvous id> in a worker of torchrun given --rdzv-id (an
    elastic restart finds its run again), else the launch time."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        return f"slurm-{job}"
    run = elastic_run()
    return f"torchrun-{run}" if run else time.strftime("%Y-%m-%d_%H-%M-%S")


def elastic_run() -> str | None:
    """torchrun's rendezvous id (TORCHELASTIC_RUN_ID, the same in every restart of its workers),
    when it names a run: not torchrun's default `none` (every run without --rdzv-id has it), and
    not in a trainer.devices worker (its agent chose the folder)."""
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run or run == "none" or "LAUNCHER_SPAWNED" in os.environ:
        return None
    if not RUN_ID.fullmatch(run):
        raise ConfigError(
            f"TORCHELASTIC_RUN_ID={run!r} (torchrun --rdzv-id): names the default run folder "
            "(torchrun-<id>); use 1-128 letters, digits, '.', '_' or '-', not starting with '.' "
            "or '-' (or give run_dir)"
        )
    return run


def restart_note(run_dir: str | None) -> str | None:
    """What to say when torch's elastic agent restarted the workers of a run whose default
    folder cannot be found again (no --rdzv-id, not under Slurm): it starts over in a new one."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restart == "0" or "LAUNCHER_SPAWNED" in os.environ or reuses_run_dir(run_dir):
        return None
    return (
        f"launcher: torchrun restarted this run's workers (restart {restart}) without --rdzv-id: "
        "its default run folder is a new one, so it starts over; give torchrun --rdzv-id=NAME "
        "or run_dir=DIR for restarts that continue the same run"
    )


def reuses_run_dir(run_dir: str | None) -> bool:
    """An explicit run_dir, or the Slurm job's or the elastic run's: used as it is, never given a
    -2 suffix."""
    return run_dir is not None or "SLURM_JOB_ID" in os.environ or elastic_run() is not None


def create_run_dir(path: Path, explicit: bool) -> Path:
    """Create the run directory; a default one that exists already gets a -2, -3 ... suffix."""
    if explicit:
        path.mkdir(parents=True, exist_ok=True)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = path, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
            candidate = path.with_name(f"{path.name}-{n}")


def write_plan_files(run_dir: Path, cfg: RunConfig, plan: BatchPlan, device: str) -> None:
    """config.yaml, plan.json and, for DeepSpeed, the ds_config.json the plan implies."""
    import yaml

    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    plan_json = json.dumps(dataclasses.asdict(plan), indent=2, allow_nan=False)  # valid JSON
    (run_dir / "plan.json").write_text(plan_json + "\n")
    write_config(run_dir, cfg, plan, device)
