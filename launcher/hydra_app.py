"""`python -m launcher` as a Hydra application: Hydra's command line, run folders, `.hydra/`
records, logging, launcher and sweeper, with the launcher's checks first.

1. Hydra's own argument parser reads the command line: -m/--multirun, --config-dir/-cd, --cfg
   job|hydra|all (with --resolve, --package), --info [...], --shell-completion, --version,
   --hydra-help. Refused in one line: --config-name/-cn and --config-path/-cp (the primary config
   is the launcher's conf/config.yaml; yours goes in a recipe of your --config-dir) and
   --experimental-rerun (it unpickles a file). -h/--help is the launcher's help (cli.py);
   --version and --shell-completion as launcher/flags.py gives them.
2. Every job of a run or a grid sweep is composed and checked (job.validate) before Hydra starts:
   bad input, Hydra's own included (an unknown hydra.foo, a plugin that is not installed), is one
   line with exit 2 and nothing written.
3. Where runs go has one source of truth, Hydra's: hydra.run.dir for a run, hydra.sweep.dir and
   hydra.sweep.subdir for a sweep's jobs. `run_dir=DIR` is an alias of hydra.run.dir=DIR (of
   hydra.sweep.dir=DIR under -m: the jobs go to DIR/0, DIR/1, ...); both given, they must agree.
   Neither given: outputs/<recipe>/<time> (-2, -3 ... when taken), outputs/<recipe>/multirun-<time>
   for a sweep, or .../slurm-<job id> under Slurm (a requeued job finds its run again), or
   .../torchrun-<rendezvous id> under torchrun given --rdzv-id (so does an elastic restart).
4. Hydra runs the jobs: each folder gets .hydra/{config,hydra,overrides}.yaml and launcher.log,
   then the task trains the job (job.execute), or starts its trainer.devices workers with
   hydra.run.dir set to the folder, and returns the job's objective
   (launcher/training/objective.py). The basic launcher runs them here, one after another; joblib
   and submitit_local in other processes on this machine (one process per job), submitit_slurm as
   Slurm jobs of the cluster's shape (hydra.launcher.* set from cluster.* and slurm.*; validate
   planned for that world). A job in another process has no Context: it finds its own (_elsewhere),
   and its errors go back inside Hydra's pickled job result (Carried -> Failed). The optuna
   sweeper's direction is set from the objective.
5. Every other process of a job (ranks > 0 started by torchrun, accelerate, deepspeed or srun, and
   trainer.devices workers) runs the same command; their Hydra outputs go to a temporary folder
   deleted at exit, and they train in rank 0's folder (the backend broadcasts it).
hydra.job.chdir=true is honoured where one process trains; with several it is refused (the other
ranks learn rank 0's folder only once connected, after their paths are resolved).

(Over 400 lines on purpose: it is one piece of glue, Hydra's entry point and what the launcher
checks around it; its parts are only ever read together.)
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher import log
from launcher.errors import ConfigError

LOCAL_RANK = ("--local_rank=", "--local-rank=")  # the `deepspeed` launcher appends it
REFUSED = {
    "config_name": "--config-name/-cn: the launcher's primary config is its own conf/config.yaml; "
    "put your settings in a recipe of your config folder (--config-dir DIR +recipe=NAME)",
    "config_path": "--config-path/-cp: the launcher's primary config is its own conf/config.yaml; "
    "give your config folder with --config-dir DIR",
    "experimental_rerun": "--experimental-rerun: not supported (it unpickles a file); a run's "
    ".hydra/overrides.yaml holds the arguments that re-create it",
}
SHOW = ("cfg", "info", "shell_completion", "hydra_help")  # Hydra prints something, trains nothing
PLACEMENT = ("run_dir", "hydra.run.dir", "hydra.sweep.dir")
LAUNCHERS = {  # the hydra/launcher options a sweep can use: where they run each job
    "basic": "one after another in this process",
    "joblib": "in parallel, in worker processes on this machine (one process per job)",
    "submitit_local": "in parallel, as local processes (one process per job)",
    "submitit_slurm": "as Slurm jobs, each on the cluster's nodes x devices",
}
SWEEPERS = ("basic", "optuna")
FROM_CLUSTER = {  # hydra.launcher keys the launcher sets for submitit_slurm: where they come from
    "nodes": "cluster.nodes",
    "tasks_per_node": "cluster.devices_per_node",
    "gpus_per_node": "cluster.devices_per_node",
    "cpus_per_task": "slurm.cpus_per_task",
    "mem_gb": "slurm.mem",
    "mem_per_gpu": "slurm.mem_per_gpu",
    "timeout_min": "slurm.time",
    "partition": "slurm.partition",
    "account": "slurm.account",
    "signal_delay_s": "slurm.signal_seconds",
    "additional_parameters": "slurm.extra",
}


class Failed(BaseException):
    """An error of a job, carried through Hydra's handlers (they catch Exception) to cli.py."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


class Carried(Exception):
    """A job's error in a Hydra launcher plugin's process (a joblib worker, a submitit task).
    Hydra keeps it in the job's result, which goes back pickled; it arrives as Failed, so the
    launching process says it in one line with the launcher's exit code."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error

    def __reduce__(self) -> tuple:
        return Failed, (self.error,)


@dataclass
class Context:
    """What the task function needs besides the job's config (set before Hydra runs)."""

    config_dir: Path | None
    launched: Any  # the topology the jobs train on (job.ValidatedLaunch.launched)
    workers: int  # trainer.devices workers each job starts (0: it trains in this process)
    rank: int = 0
    # ranks > 0: Hydra's folder for them (scratch) and the run's or sweep's real one; a job's
    # folder is the real one + its path under scratch (hydra.sweep.subdir, whatever it is)
    scratch: Path | None = None
    real: Path | None = None
    locked: Path | None = None  # the folder whose lock this process holds (its workers share it)


CONTEXT: Context | None = None


class _Version(argparse._VersionAction):
    """--version: the launcher's version, then Hydra's line (launcher/flags.py), when asked."""

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        from launcher.flags import version

        self.version = version()
        super().__call__(parser, *args, **kwargs)


def parse(argv: list[str]) -> argparse.Namespace:
    """Hydra's command line; unknown flags and Hydra's parse errors are one-line bad input."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def error(message: str) -> None:
        raise ConfigError(message)

    parser.error = error  # argparse prints its usage and exits 2; the launcher says one line
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # --version's lines as they are
    for action in parser._actions:
        if isinstance(action, argparse._VersionAction):  # Hydra's: "Hydra 1.3.8" alone
            action.__class__ = _Version
    args, unknown = parser.parse_known_intermixed_args(  # overrides before and after flags
        [a for a in argv if not a.startswith(LOCAL_RANK)]
    )
    if unknown:
        raise ConfigError(
            f"{unknown[0]}: unknown option; options are Hydra's (-m, --config-dir, --cfg, --info, "
            "--shell-completion, --version, --hydra-help) and -h/--help"
        )
    for key, why in REFUSED.items():
        if getattr(args, key):
            raise ConfigError(why)
    modes = {"--run": args.run, "-m": args.multirun, "--cfg": args.cfg, "--info": args.info}
    modes |= {"--shell-completion": args.shell_completion}
    given = [flag for flag, value in modes.items() if value]
    if len(given) > 1:  # Hydra's own checks, which it raises as tracebacks
        raise ConfigError(f"{' and '.join(given)}: give one of --run, -m, --cfg, --info, -sc")
    if args.resolve and not args.cfg:
        raise ConfigError("--resolve: only with --cfg (it resolves the config --cfg shows)")
    return args


def _value(overrides: list[str], key: str) -> str | None:
    """The value the last override of `key` gives, as Hydra reads it (unquoted), or None."""
    from launcher.config.compose import override_value

    found = [o for o in overrides if o.partition("=")[0].lstrip("+") == key]
    return override_value(found[-1]) if found else None


def placement(overrides: list[str], multirun: bool) -> str | None:
    """The folder the user chose (run_dir, or the hydra key it stands for), or None."""
    for name in PLACEMENT:
        given = _value(overrides, name)
        if given is not None and not given.strip():
            raise ConfigError(f"{name}={given!r}: empty; give a folder (or leave it out)")
    alias, key = _value(overrides, "run_dir"), "hydra.sweep.dir" if multirun else "hydra.run.dir"
    hydra = _value(overrides, key)
    if alias is not None and hydra is not None and Path(alias).resolve() != Path(hydra).resolve():
        raise ConfigError(
            f"run_dir={alias!r} and {key}={hydra!r}: run_dir is an alias of {key}; give one"
        )
    return hydra if hydra is not None else alias


def main(argv: list[str]) -> None:
    """Check, then hand the jobs to Hydra. Raises ConfigError (bad input) or Failed (a job).
    (Over 60 lines: one sequence of checks, each a few lines, read in the order they run.)"""
    from launcher.config.compose import hydra_quote, prepare_overrides, user_config_dir

    args = parse(argv)
    config_dir = user_config_dir(args.config_dir) if args.config_dir else None
    if config_dir is not None:
        args.config_dir = str(config_dir)
    overrides = list(args.overrides)
    if args.shell_completion:  # Hydra's, checked first, also for python -m launcher
        from launcher.flags import shell_completion

        shell_completion(args.overrides, lambda: _run(args))
        return
    if any(getattr(args, key) for key in SHOW):
        if not args.hydra_help:  # Hydra's help composes its own config, without the primary
            from launcher.config.compose import check_composes, split_sweep

            multirun = args.multirun or "hydra.mode=MULTIRUN" in overrides
            check_composes(split_sweep(overrides)[0] if multirun else overrides, config_dir)
            args.overrides = prepare_overrides(overrides, config_dir)[1]
        _run(args)
        return
    multirun = args.multirun or "hydra.mode=MULTIRUN" in overrides
    chosen = placement(overrides, multirun)
    checked = [o for o in overrides if o.partition("=")[0] not in PLACEMENT]
    if chosen is not None:
        checked.append(f"run_dir={hydra_quote(chosen)}")
    from launcher.cluster.topology import from_env
    from launcher.training.job import validate
    from launcher.training.run_folder import create_run_dir, restart_note, reuses_run_dir

    plugin = _plugins(overrides, multirun)
    slurm = _slurm_shape(checked, multirun, config_dir) if plugin == "submitit_slurm" else None
    jobs = validate(checked, multirun, config_dir, launched=slurm)
    rank = from_env().rank
    several = jobs.workers > 1 or jobs.launched.world_size > 1
    if _value(overrides, "hydra.job.chdir") in ("true", "True") and several:
        raise ConfigError(
            "hydra.job.chdir=true: honoured where one process trains; with several, the other "
            "ranks learn rank 0's folder only once connected (use absolute paths instead)"
        )
    extra = _plugin_settings(plugin, jobs, overrides)
    where, target, new, scratch = [], chosen, [], None
    if rank > 0:  # Hydra's outputs of this process go nowhere; it trains in rank 0's folder
        scratch = tempfile.mkdtemp(prefix="launcher-rank-")
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        where = [f"hydra.run.dir={scratch}", f"hydra.sweep.dir={scratch}"]
        where += ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    elif chosen is None:  # the launcher's default folder, reserved now (a -2 suffix if taken)
        folder = jobs.run_dirs[0].parent if multirun else jobs.run_dirs[0]
        note = restart_note(None)
        if note:
            log.warn(note)
        new = _new_dirs(folder)
        target = create_run_dir(folder, explicit=reuses_run_dir(jobs.configs[0].run_dir))
        where = [f"hydra.{'sweep' if multirun else 'run'}.dir={hydra_quote(str(target))}"]
    elif _value(overrides, "hydra.sweep.dir" if multirun else "hydra.run.dir") is None:
        where = [f"hydra.{'sweep' if multirun else 'run'}.dir={hydra_quote(chosen)}"]
    if rank == 0 and chosen is not None:
        new = _new_dirs(Path(chosen))
    kept = _records(Path(target)) if rank == 0 else {}
    locked = rank == 0 and "LAUNCHER_SPAWNED" not in os.environ  # workers: the agent holds it
    if locked:
        from launcher.checkpoint.lock import acquire

        acquire(Path(target))
    global CONTEXT
    real = Path(chosen) if chosen else jobs.run_dirs[0].parent if multirun else jobs.run_dirs[0]
    scratch_dir = Path(scratch) if scratch else None
    held = Path(target) if locked else None
    CONTEXT = Context(
        config_dir, jobs.launched, jobs.workers, rank, scratch_dir, real.absolute(), held
    )
    user = [o for o in overrides if o.partition("=")[0] != "run_dir"]
    args.overrides = [*prepare_overrides(user, config_dir)[1], *where, *extra]
    from launcher.checkpoint.lock import NAME, release

    try:
        _run(args)
    except Failed as failed:
        if rank == 0 and isinstance(failed.error, ConfigError):  # bad input: nothing written
            release(Path(target) / NAME, os.getpid())
            _discard(Path(target), new, kept)
        raise
    finally:
        if locked:  # also at exit (atexit), for a process that dies on its way out
            release(Path(target) / NAME, os.getpid())


def _plugins(overrides: list[str], multirun: bool) -> str:
    """The hydra/launcher chosen (basic when none), after refusing what cannot be honoured."""
    from launcher.cluster.topology import from_env

    launcher = _value(overrides, "hydra/launcher") or "basic"
    sweeper = _value(overrides, "hydra/sweeper") or "basic"
    if launcher not in LAUNCHERS:
        ok = "; ".join(f"{name}: {how}" for name, how in LAUNCHERS.items())
        raise ConfigError(f"hydra/launcher={launcher!r}: not supported; choose {ok}")
    if sweeper not in SWEEPERS:
        raise ConfigError(
            f"hydra/sweeper={sweeper!r}: not supported; choose basic (a grid) or optuna (a search)"
        )
    for key, name in (("hydra/launcher", launcher), ("hydra/sweeper", sweeper)):
        if name != "basic" and not multirun:
            raise ConfigError(
                f"{key}={name}: runs the jobs of a sweep; add -m (a single run ignores it)"
            )
    if launcher != "basic" and from_env().started:
        raise ConfigError(
            f"hydra/launcher={launcher}: starts each job's processes itself; run the sweep as a "
            "plain python -m launcher -m, not under torchrun, accelerate, deepspeed or srun"
        )
    return launcher


def _slurm_shape(overrides: list[str], multirun: bool, config_dir: Path | None) -> Any:
    """The processes each submitit_slurm job trains on: the cluster's nodes x devices, one Slurm
    task per device (topology.slurm_env turns srun's variables into torch's)."""
    from launcher.cluster.sbatch import check_shape
    from launcher.cluster.topology import Topology
    from launcher.config.compose import compose_run, split_sweep

    cfg = compose_run(split_sweep(overrides)[0] if multirun else overrides, config_dir)
    check_shape(cfg.cluster)
    c = cfg.cluster
    world = int(c.nodes) * int(c.devices_per_node)
    source = "hydra/launcher=submitit_slurm"
    return Topology(world, 0, 0, int(c.devices_per_node), c.device, source, True)


def _plugin_settings(plugin: str, jobs: Any, overrides: list[str]) -> list[str]:
    """Overrides for the chosen launcher and sweeper: submitit_slurm's job shape and resources
    from cluster.* and slurm.*, the sweeper's direction from the objective."""
    found: list[str] = []
    if plugin in ("joblib", "submitit_local") and (jobs.workers or jobs.launched.world_size > 1):
        raise ConfigError(
            f"hydra/launcher={plugin}: runs one process per job; for jobs of "
            f"{max(jobs.workers, jobs.launched.world_size)} processes use hydra/launcher=basic "
            "(trainer.devices) or submitit_slurm"
        )
    if plugin == "submitit_slurm":
        found += _submitit(jobs.configs, overrides)
    if (_value(overrides, "hydra/sweeper") or "basic") != "basic":
        from launcher.training.objective import DIRECTION

        objectives = {cfg.objective for cfg in jobs.configs}
        if len(objectives) > 1:
            raise ConfigError("-m: a search cannot vary objective (what it optimises)")
        objective = objectives.pop()
        direction, given = DIRECTION[objective], _value(overrides, "hydra.sweeper.direction")
        if given is not None and given != direction:
            raise ConfigError(
                f"hydra.sweeper.direction={given}: objective={objective} is to {direction}; "
                "drop the direction (the launcher sets it) or choose another objective"
            )
        if objective != "eval_loss":
            from launcher.memory.probe import gives_accuracy

            distinct = {repr((c.model, c.data, c.loss)): c for c in jobs.configs}
            if not all(gives_accuracy(cfg.model, cfg.data, cfg.loss) for cfg in distinct.values()):
                raise ConfigError(
                    f"objective={objective}: this model's outputs are not class scores of integer "
                    "targets, so its evaluation gives no accuracy; use objective=eval_loss"
                )
        found.append(f"hydra.sweeper.direction={direction}")
    return found


def _submitit(configs: list[Any], overrides: list[str]) -> list[str]:
    """hydra.launcher.* for submitit_slurm, from the jobs' cluster and slurm settings (one
    launcher config per sweep: they cannot vary); the same sbatch options the templates get."""
    from launcher.cluster.sbatch import resources

    first = configs[0]
    for cfg in configs[1:]:
        for key in ("cluster", "slurm"):
            if getattr(cfg, key) != getattr(first, key):
                raise ConfigError(
                    f"-m: with hydra/launcher=submitit_slurm a sweep cannot vary {key}.* (one "
                    "Slurm job shape per sweep); launch one sweep per setting"
                )
    for key, source in FROM_CLUSTER.items():
        given = (o.partition("=")[0].lstrip("+").split(".") for o in overrides)
        if any(parts[:3] == ["hydra", "launcher", key] for parts in given):
            raise ConfigError(
                f"hydra.launcher.{key}: the launcher sets it from {source}; set that instead"
            )
    c, s = first.cluster, first.slurm
    tasks = int(c.devices_per_node)
    found = {"nodes": c.nodes, "tasks_per_node": tasks, "signal_delay_s": s.signal_seconds}
    sbatch = resources(first.cluster, first.slurm, first.data, tasks)
    found["cpus_per_task"] = int(sbatch.pop("cpus-per-task"))
    if c.device == "cuda":
        found["gpus_per_node"] = tasks
    for key in ("partition", "account"):
        if getattr(s, key):
            found[key] = getattr(s, key)
    sbatch |= {"time": s.time, "requeue": ""}
    sbatch |= dict(option[2:].partition("=")[::2] for option in s.extra)
    extra = "+hydra.launcher.additional_parameters"  # more sbatch options, written as given
    return [f"hydra.launcher.{k}={v}" for k, v in found.items()] + [
        f"{extra}.{k}={v!r}" if v else f"{extra}.{k}=true" for k, v in sbatch.items()
    ]


RECORDS = (".hydra/*.yaml", "launcher.log", "multirun.yaml", "*/.hydra/*.yaml", "*/launcher.log")


def _records(folder: Path) -> dict[Path, bytes]:
    """Hydra's records already in `folder` (a run resumed there): what a refusal restores."""
    if not folder.is_dir():
        return {}
    return {p: p.read_bytes() for pattern in RECORDS for p in folder.glob(pattern) if p.is_file()}


def _new_dirs(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first."""
    new, path = [], folder.absolute()
    while not path.exists():
        new.append(path)
        path = path.parent
    return new


def _discard(folder: Path, new: list[Path], kept: dict[Path, bytes]) -> None:
    """Undo what Hydra wrote (.hydra/, launcher.log, multirun.yaml) for a launch refused as bad
    input: records that were there before (a run resumed there) as they were, the others gone,
    and the folders made for it if empty."""
    for path in set(_records(folder)) - set(kept):
        path.unlink()
    for path, content in kept.items():
        path.write_bytes(content)
    for hydra in [*folder.glob(".hydra"), *folder.glob("*/.hydra")]:
        if not any(hydra.iterdir()):
            hydra.rmdir()
    for job in folder.iterdir() if folder.is_dir() else []:
        if job.is_dir() and not any(job.iterdir()):
            job.rmdir()
    for path in new:
        try:
            path.rmdir()
        except OSError:  # not empty: something else is there
            break


def _run(args: argparse.Namespace) -> None:
    from hydra import version
    from hydra._internal.utils import _run_hydra, get_args_parser

    from launcher.config.resources import conf_search_path

    version.setbase("1.3")
    _run_hydra(
        args=args,
        args_parser=get_args_parser(),
        task_function=task,
        config_path=conf_search_path(),
        config_name="config",
    )


def task(cfg: Any) -> float | None:
    """One job, as Hydra hands it over; returns its objective (launcher/training/objective.py), the
    value a sweeper optimises (None on ranks > 0 and under plan_only)."""
    from launcher.errors import LauncherError

    try:
        return _task(cfg)
    except LauncherError as exc:
        if CONTEXT is None:  # a plugin's process: the error goes back with the job's result
            raise Carried(exc) from None
        raise Failed(exc) from None  # the launcher's own outcomes: cli.py gives their exit codes


def _elsewhere(hydra: Any) -> Context:
    """The context of a job that a Hydra launcher plugin runs in another process (a joblib
    worker, a submitit task), from the job itself: the config folder from Hydra's search path,
    the processes from the environment (srun's tasks under submitit_slurm), the run folder
    Hydra made (every task of a Slurm job gets the same one)."""
    from launcher.cluster.topology import from_env, slurm_env

    os.environ.update(slurm_env(os.environ))
    launched = from_env()
    folders = [
        Path(source.path)
        for source in hydra.runtime.config_sources
        if source.provider == "command-line" and source.schema == "file"
    ]
    return Context(folders[0] if folders else None, launched, 0, launched.rank)


def _task(cfg: Any) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from launcher.batchsize.sweep import read_job
    from launcher.config.compose import DEFAULT_RECIPE, check_clashes, config_dir_args, hydra_quote
    from launcher.config.schema import to_run_config
    from launcher.training import objective
    from launcher.training.job import concrete, execute, start_workers

    hydra = HydraConfig.get()
    context = CONTEXT or _elsewhere(hydra)
    choices = dict(hydra.runtime.choices)
    check_clashes(choices, context.config_dir)
    node = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    run_dir = Path(hydra.runtime.output_dir)
    if context.scratch is not None and context.real is not None:  # a rank > 0: where it resumes
        run_dir = context.real / run_dir.relative_to(context.scratch)
    node |= {"recipe": choices.get("recipe@_global_", DEFAULT_RECIPE), "run_dir": str(run_dir)}
    launched = context.launched
    run_cfg = concrete(to_run_config(node), launched)  # the job's, as Hydra composed it
    if context.workers:
        task_overrides = [o for o in hydra.overrides.task if o.partition("=")[0] != "run_dir"]
        worker = ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]
        args = [*config_dir_args(context.config_dir), *task_overrides, *worker]
        folder = f"hydra.run.dir={hydra_quote(str(run_dir))}"
        start_workers(context.workers, [*args, folder], context.locked)
    else:
        run_dir = Path(execute(run_cfg, launched, run_dir)["run_dir"])
    if context.rank > 0 or run_cfg.plan_only:
        return None
    searched = hydra.mode == RunMode.MULTIRUN and "BasicSweeper" not in hydra.sweeper._target_
    try:  # from the records rank 0 wrote (here, or in the trainer.devices workers' rank 0)
        records = read_job(run_dir)[1]
        return objective.value(run_cfg.objective, records, run_cfg.target_accuracy)
    except ConfigError:
        if searched:  # the sweeper needs the value
            raise
        return None
