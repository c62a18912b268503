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
   line with exit 2 and nothing written (launcher/checkpoint/rollback.py undoes what Hydra wrote
   before a job refused it). The check composes what Hydra's run will (the overrides Hydra gets,
   its run folder and mode aside), and Hydra's run is handed that composition
   (hydra_internals.composing_once): a run is composed once, and its job takes the checked
   config and plan (Context.job).
3. Where runs go has one source of truth, Hydra's: hydra.run.dir for a run, hydra.sweep.dir and
   hydra.sweep.subdir for a sweep's jobs. `run_dir=DIR` is an alias of hydra.run.dir=DIR (of
   hydra.sweep.dir=DIR under -m: the jobs go to DIR/0, DIR/1, ...); both given, they must agree.
   Neither given: outputs/<recipe>/<time> (-2, -3 ... when taken), outputs/<recipe>/multirun-<time>
   for a sweep, or .../slurm-<job id> under Slurm (a requeued job finds its run again), or
   .../torchrun-<rendezvous id> under torchrun given --rdzv-id (so does an elastic restart).
4. Hydra runs the jobs (launcher/config/hydra_internals.py: what `@hydra.main` does inside):
   each folder gets .hydra/{config,hydra,overrides}.yaml and launcher.log, then the task trains
   the job (job.execute), or starts its trainer.devices workers with hydra.run.dir set to the
   folder, and returns the job's objective (launcher/training/objective.py). The basic launcher
   runs them here, one after another; joblib and submitit_local in other processes on this
   machine (one process per job), submitit_slurm as Slurm jobs of the cluster's shape
   (launcher/cluster/plugins.py; validate plans for that world). The task carries the Context
   of the process that checked the command line; pickled to a plugin's process it arrives without
   one and finds its own (_elsewhere), and its errors go back inside Hydra's pickled job result
   (Carried -> Failed). The optuna sweeper's direction is set from the objective.
5. Every other process of a job (ranks > 0 started by torchrun, accelerate, deepspeed or srun, and
   trainer.devices workers) runs the same command; their Hydra outputs go to a temporary folder
   deleted at exit, and they train in rank 0's folder (the backend broadcasts it).
hydra.job.chdir=true is honoured where one process trains; with several it is refused (the other
ranks learn rank 0's folder only once connected, after their paths are resolved).
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, cast

from hydra.conf import HydraConf
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from launcher import log
from launcher.checkpoint import rollback
from launcher.checkpoint.lock import join
from launcher.cluster import plugins
from launcher.cluster.topology import Topology, from_env, slurm_env
from launcher.config.compose import (
    DEFAULT_RECIPE,
    check_clashes,
    check_composes,
    compose_run,
    config_dir_args,
    hydra_quote,
    override_value,
    prepare_overrides,
    split_sweep,
    user_config_dir,
)
from launcher.config.hydra_internals import (
    command_line_parser,
    composing_once,
    config_dir_of,
    run_hydra,
)
from launcher.config.resources import conf_search_path
from launcher.config.schema import ConcreteConfig, to_run_config
from launcher.errors import ConfigError, LauncherError
from launcher.flags import shell_completion, version
from launcher.training import objective
from launcher.training.run_folder import create_run_dir, restart_note, reuses_run_dir

if TYPE_CHECKING:
    from launcher.training.job import ValidatedLaunch  # heavy: numpy
    from launcher.training.job_plan import Planned  # heavy: numpy

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
QUIET = ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]


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

    def __reduce__(self) -> tuple[type[Failed], tuple[Exception]]:
        return Failed, (self.error,)


@dataclass(frozen=True)
class Context:
    """What the task needs besides the job's config, from the process that checked it."""

    config_dir: Path | None
    launched: Topology  # the topology the jobs train on (job.ValidatedLaunch.launched)
    workers: int  # trainer.devices workers each job starts (0: it trains in this process)
    rank: int = 0
    # ranks > 0: Hydra's folder for them (scratch) and the run's or sweep's real one; a job's
    # folder is the real one + its path under scratch (hydra.sweep.subdir, whatever it is)
    scratch: Path | None = None
    real: Path | None = None
    locked: Path | None = None  # the folder whose lock this process holds (its workers share it)
    # a run's (not a sweep's) job as checked: its concrete config and plan, which the job takes
    # over (the config Hydra hands it is the one checked: hydra_internals.composing_once)
    job: tuple[ConcreteConfig, Planned] | None = None


def _refuse(message: str) -> NoReturn:
    raise ConfigError(message)


def parse(argv: list[str]) -> argparse.Namespace:
    """Hydra's command line; unknown flags and Hydra's parse errors are one-line bad input."""
    parser = command_line_parser(_refuse, version)
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
    """Check, then hand the jobs to Hydra. Raises ConfigError (bad input) or Failed (a job)."""
    join()  # a trainer.devices worker shares its launcher's lock of the run folder
    args = parse(argv)
    config_dir = user_config_dir(args.config_dir) if args.config_dir else None
    if config_dir is not None:
        args.config_dir = str(config_dir)
    overrides = list(args.overrides)
    multirun = args.multirun or "hydra.mode=MULTIRUN" in overrides
    if args.shell_completion:  # Hydra's, checked first, also for python -m launcher
        shell_completion(args.overrides, lambda: _run(args, Task()))
        return
    if any(getattr(args, key) for key in SHOW):
        if not args.hydra_help:  # Hydra's help composes its own config, without the primary
            check_composes(split_sweep(overrides)[0] if multirun else overrides, config_dir)
            args.overrides = prepare_overrides(overrides, config_dir)[1]
        _run(args, Task())
        return
    chosen = placement(overrides, multirun)
    with composing_once():  # the checked composition is the one Hydra's run is handed
        _launch(args, overrides, chosen, multirun, config_dir)


def _launch(
    args: argparse.Namespace,
    overrides: list[str],
    chosen: str | None,
    multirun: bool,
    config_dir: Path | None,
) -> None:
    # the overrides Hydra composes (Hydra's run folder settings added after: where); ranks > 0
    # quiet Hydra's outputs: checked with them, so that the check composes what Hydra will
    user = [o for o in overrides if o.partition("=")[0] != "run_dir"]
    user += QUIET if _other_rank() else []
    jobs, rank, extra = _checked(user, chosen, multirun, config_dir)
    real = Path(chosen) if chosen else jobs.run_dirs[0].parent if multirun else jobs.run_dirs[0]
    job = None if multirun else (jobs.configs[0], jobs.planned[0])
    context = Context(config_dir, jobs.launched, jobs.workers, rank, real=real.absolute(), job=job)
    if rank > 0:  # Hydra's outputs of this process go nowhere; it trains in rank 0's folder
        scratch = Path(tempfile.mkdtemp(prefix="launcher-rank-"))
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        where = [f"hydra.run.dir={scratch}", f"hydra.sweep.dir={scratch}"]
        if QUIET[0] not in user:  # (the environment did not say the rank before the check)
            where += QUIET
        args.overrides = [*prepare_overrides(user, config_dir)[1], *where, *extra]
        _run(args, Task(replace(context, scratch=scratch)))
        return
    target, where, new = _reserve(chosen, real, jobs, overrides, multirun)
    was = rollback.before(target, new)
    locked = "LAUNCHER_SPAWNED" not in os.environ  # trainer.devices workers: the agent holds it
    with rollback.held(target, locked):
        context = replace(context, locked=target if locked else None)
        args.overrides = [*prepare_overrides(user, config_dir)[1], *where, *extra]
        try:
            _run(args, Task(context))
        except Failed as failed:
            if isinstance(failed.error, ConfigError):  # bad input: nothing left written
                rollback.undo(was)
            raise


def _other_rank() -> bool:
    """This process is a rank > 0, as the environment says it (its errors: said by the check)."""
    try:
        return from_env(cuda=False).rank > 0
    except ConfigError:
        return False


def _checked(
    overrides: list[str], chosen: str | None, multirun: bool, config_dir: Path | None
) -> tuple[ValidatedLaunch, int, list[str]]:
    """Every job composed from `overrides` (Hydra's, the run folder aside: `chosen` is its
    run_dir) and checked (job.validate) for the processes it trains on, and the plugins chosen;
    returns the jobs, this process's rank, and the overrides that set the chosen launcher and
    sweeper from the jobs (submitit_slurm's job shape, the search's direction)."""
    from launcher.training.job import validate  # heavy: numpy

    launcher = _value(overrides, "hydra/launcher") or "basic"
    plugins.check_choice(launcher, _value(overrides, "hydra/sweeper") or "basic", multirun)
    if launcher != "basic":  # (from_env imports torch: only when it matters)
        plugins.check_launched(launcher, from_env())
    slurm = None
    if launcher == "submitit_slurm":  # validate plans for the Slurm job's world
        first = split_sweep(overrides)[0] if multirun else overrides
        slurm = plugins.slurm_shape(compose_run(first, config_dir).cluster)
    jobs = validate(overrides, multirun, config_dir, launched=slurm, chosen=chosen)
    rank = from_env().rank
    several = jobs.workers > 1 or jobs.launched.world_size > 1
    if _value(overrides, "hydra.job.chdir") in ("true", "True") and several:
        raise ConfigError(
            "hydra.job.chdir=true: honoured where one process trains; with several, the other "
            "ranks learn rank 0's folder only once connected (use absolute paths instead)"
        )
    plugins.check_processes(launcher, jobs.workers, jobs.launched.world_size)
    extra = []
    if launcher == "submitit_slurm":
        extra += plugins.submitit_settings(jobs.configs, overrides)
    if (_value(overrides, "hydra/sweeper") or "basic") != "basic":
        direction = objective.direction(jobs.configs, _value(overrides, "hydra.sweeper.direction"))
        extra.append(f"hydra.sweeper.direction={direction}")
    return jobs, rank, extra


def _reserve(
    chosen: str | None, default: Path, jobs: ValidatedLaunch, overrides: list[str], multirun: bool
) -> tuple[Path, list[str], list[Path]]:
    """Rank 0's run (or sweep) folder: the chosen one, or `default` reserved now (a -2 suffix if
    taken); with the override that sends Hydra's outputs there (none where the command line
    gives it) and the folders that did not exist before (rollback.new_dirs)."""

    key = f"hydra.{'sweep' if multirun else 'run'}.dir"
    if chosen is not None:
        where = [] if _value(overrides, key) is not None else [f"{key}={hydra_quote(chosen)}"]
        return Path(chosen), where, rollback.new_dirs(Path(chosen))
    note = restart_note(None)
    if note:
        log.warn(note)
    new = rollback.new_dirs(default)
    target = create_run_dir(default, explicit=reuses_run_dir(jobs.configs[0].run_dir))
    return target, [f"{key}={hydra_quote(str(target))}"], new


def _run(args: argparse.Namespace, task: Task) -> None:
    run_hydra(args, task, conf_search_path(), "config")


@dataclass(frozen=True)
class Task:
    """The task function Hydra runs for each job, with the context of the process that checked
    the command line. Pickled to a launcher plugin's process it arrives without one: there, the
    job finds its own (_elsewhere)."""

    context: Context | None = None

    def __call__(self, cfg: DictConfig) -> float | None:
        """One job, as Hydra hands it over; returns its objective (launcher/training/
        objective.py), the value a sweeper optimises (None on ranks > 0 and under plan_only)."""
        try:
            return _train(cfg, self.context)
        except LauncherError as exc:
            if self.context is None:  # a plugin's process: the error goes back with the result
                raise Carried(exc) from None
            raise Failed(exc) from None  # the launcher's own outcomes: cli.py gives their codes

    def __reduce__(self) -> tuple[type[Task], tuple[()]]:
        return Task, ()


def _elsewhere(hydra: HydraConf) -> Context:
    """The context of a job that a Hydra launcher plugin runs in another process (a joblib
    worker, a submitit task), from the job itself: the config folder from Hydra's search path,
    the processes from the environment (srun's tasks under submitit_slurm), the run folder
    Hydra made (every task of a Slurm job gets the same one)."""
    os.environ.update(slurm_env(os.environ))
    launched = from_env()
    return Context(config_dir_of(hydra.runtime.config_sources), launched, 0, launched.rank)


def _train(cfg: DictConfig, given: Context | None) -> float | None:
    from launcher.training.job import concrete, execute, start_workers  # heavy: numpy

    hydra = HydraConfig.get()
    context = given or _elsewhere(hydra)
    choices = dict(hydra.runtime.choices)
    check_clashes(choices, context.config_dir)
    run_dir = Path(hydra.runtime.output_dir)
    if context.scratch is not None and context.real is not None:  # a rank > 0: where it resumes
        run_dir = context.real / run_dir.relative_to(context.scratch)
    launched, planned = context.launched, None
    if context.job is not None and hydra.mode == RunMode.RUN:  # the run checked here: its job
        checked, planned = context.job
        run_cfg = ConcreteConfig(replace(checked, run_dir=str(run_dir)))
    else:
        node = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        recipe = choices.get("recipe@_global_", DEFAULT_RECIPE)
        composed = to_run_config(
            {**cast(dict[str, Any], node), "recipe": recipe, "run_dir": str(run_dir)}
        )
        run_cfg = concrete(composed, launched)  # the job's, as Hydra composed it
    if context.workers:
        task_overrides = [o for o in hydra.overrides.task if o.partition("=")[0] != "run_dir"]
        args = [*config_dir_args(context.config_dir), *task_overrides, *QUIET]
        folder = f"hydra.run.dir={hydra_quote(str(run_dir))}"
        start_workers(context.workers, [*args, folder], context.locked)
    else:
        run_dir = Path(execute(run_cfg, launched, run_dir, planned)["run_dir"])
    if context.rank > 0 or run_cfg.plan_only:
        return None
    searched = hydra.mode == RunMode.MULTIRUN and "BasicSweeper" not in hydra.sweeper._target_
    # from the records rank 0 wrote (here, or in the trainer.devices workers' rank 0); the
    # sweeper needs the value
    return objective.of_run(run_dir, run_cfg.objective, run_cfg.target_accuracy, searched)
