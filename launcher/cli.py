"""Command line: help, dispatch, exit codes. No logic lives here (Hydra's parser and run:
launcher/hydra_app.py).

    python -m launcher [+recipe=NAME] [key=value ...]      plan, then train
    python -m launcher -m key=a,b [...]                    one job per combination (Hydra sweep)

Exit codes: 0 done, 1 failed (e.g. out of memory at micro-batch 1), 2 bad input (one line on
stderr; nothing written), 3 stopped early by SIGUSR1/SIGTERM after saving a checkpoint (rerun, or
the requeued Slurm job, resumes from it).
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from pathlib import Path

from launcher.backends import teardown
from launcher.cluster.preemption import EXIT_CODE, Stopped
from launcher.cluster.spawn import die_with_parent
from launcher.config.compose import (
    DEFAULT_RECIPE,
    GROUPS,
    group_options,
    recipe_names,
    split_config_dir,
)
from launcher.errors import ConfigError, LauncherError
from launcher.faults import test_kill

USAGE = """usage: python -m launcher [-m] [--config-dir DIR] [+recipe=NAME] [key=value ...]

  +recipe=NAME        a recipe ({recipes}); default {default}
  --config-dir DIR    your own config folder (Hydra's flag): DIR/recipe/*.yaml are recipes,
                      DIR/model/*.yaml, DIR/data/*.yaml, DIR/loss/*.yaml ... add group options;
                      an option may name your factory with _target_ (see the README){where}
  global_batch=N      samples per optimizer step over all devices (the plan derives the rest)
  micro_batch=auto|N  per-device micro-batch; max_micro_batch=N caps auto
  plan_only=true      print and save the plan, do not train (with cluster=NAME: {clusters})
  GROUP=OPTION        pick a config option: {groups}
  trainer.devices=N   start N worker processes on this machine (auto: the cluster's, or all GPUs)
  -m a=1,2 b=x,y      sweep: one job per combination, run one after another (Hydra's sweep)
  hydra.run.dir=DIR   where the run goes (run_dir=DIR is its alias; hydra.sweep.dir under -m);
                      Hydra's flags work too: --cfg job, --info, --version, --hydra-help
  ramp.start_batch=N ramp.samples=S   batch ramp-up: double from N to global_batch over S samples
  ramp.mode=adaptive ramp.start_batch=N   grow from N toward the measured noise scale (cap:
                      global_batch); python -m launcher.cbs RUN_DIR measures the critical batch
Any key of the composed config can be overridden, e.g. optim.base_lr=0.2 trainer.epochs=5.
Slurm: python -m launcher.slurm [--submit] cluster=NAME [...] writes (and submits) an sbatch script.
Batch size: each run ends with advice (noise scale, goodput); python -m launcher.report DIR gives it
for a finished run, or a sweep's table, critical-batch fit and plots.
"""


def _usage(config_dir: Path | None) -> str:
    def options(group: str) -> str:
        return "|".join(group_options(group, config_dir))

    return USAGE.format(
        recipes=", ".join(recipe_names(config_dir)),
        default=DEFAULT_RECIPE,
        where=f"\n                      (listed below with {config_dir})" if config_dir else "",
        clusters=", ".join(group_options("cluster", config_dir)),
        groups="; ".join(f"{g}={options(g)}" for g in GROUPS),
    )


def run(args: list[str]) -> None:
    from launcher import hydra_app  # heavy: hydra

    try:
        hydra_app.main(args)
    except hydra_app.Failed as failed:  # a job's error, carried through Hydra
        raise failed.error from None


def _help(args: list[str]) -> int:
    try:
        config_dir = split_config_dir(args)[0]
    except ConfigError as exc:
        print(f"launcher: error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(_usage(config_dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    die_with_parent()  # a worker of torch's elastic agent: first, before anything can hang
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        return _help(args)
    # Errors raised once ranks are connected (the memory cap is agreed by a collective, an
    # out-of-memory at micro-batch 1 by the flag gather) are raised by every rank alike, so
    # every path below may tear the process group down with a barrier.
    code, message = 0, ""
    try:
        run(args)
    except LauncherError as exc:  # launcher/errors.py: the code and the one line of each
        code, message = exc.exit_code, exc.line()
        cause = exc.__cause__
        if (
            isinstance(exc, ConfigError)
            and cause is not None
            and os.environ.get("HYDRA_FULL_ERROR") == "1"
        ):
            traceback.print_exception(cause)  # a user factory's or model's own error
        if isinstance(exc, Stopped):
            test_kill(0, "exit")  # a test's second signal while a stopped run exits
    if code and message and os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)
    if "torch" in sys.modules:  # a process group can only exist once torch was imported
        teardown()
    return code


def console() -> None:
    """`python -m launcher` and the `globalbatch` command."""
    try:
        code = main()
    except BrokenPipeError:  # `python -m launcher --help | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    if code == EXIT_CODE:  # stopped by a signal
        _exit_now(code)
    sys.exit(code)


def _exit_now(code: int) -> None:
    """Exit with `code` without Python's finalization, which restores the default signal
    handlers: a second SIGTERM or Ctrl-C in the run's last moments would end it as killed (143,
    130) instead of stopped (3). The exit handlers run first (the run folder's lock, temporary
    folders, logging), with signals still only recorded."""
    import atexit

    atexit._run_exitfuncs()
    test_kill(0, "exited")  # a test's signal in the process's last moments
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stream: nothing to say
            stream.flush()
    os._exit(code)
