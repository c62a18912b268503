"""The critical batch, measured directly: short branches from a checkpoint at k x its batch.

    python -m launcher.cbs RUN_DIR [--step N] [--k 1,2,4,8,16] [--samples N|auto]
        [--tolerance 0.05] [--out DIR] [-- launcher overrides for the branches]

The gradient noise scale rests on strong assumptions (a quadratic loss, the optimal step size for
every batch; Merrill et al. 2025, "Critical Batch Size Revisited"). This asks the training
itself: from one checkpoint of RUN_DIR (global batch B, S_0 samples consumed), each branch trains
the same next `--samples` samples, in the same order, at global batch k x B with the LR the
scaling rule gives that batch on the run's own schedule (in samples). Up to the critical batch
the branches end at about the same loss (a step of k x B does the work of k steps of B); beyond
it the larger batch falls behind. Every branch ends with its LR falling linearly to 0 over the
last `--cooldown` of its samples (trainer.stop_cooldown_samples, a warmup-stable-decay
cooldown) and is compared by its final eval loss: without the cooldown a branch's loss mid-run
mostly reflects its LR level (the larger k's k x LR keeps the iterate noisier), not what its
steps achieved. The critical batch at that point of training is the largest k x B whose loss
stays within `--tolerance` (relative) of the k=1 branch's, with every smaller k within too;
`interpolated` is where the gap crosses the tolerance, linear in log k between that k and the
next one.

A branch is a launcher run (launcher/training/job.py execute, so the same loop, backend, memory cap
and checkpoints): resume=THE_CHECKPOINT with checkpoint.allow_global_batch_change=true,
global_batch=k x B, trainer.stop_after_samples=S_0 + samples; its folder is OUT/k<k>. A k whose
plan would swap the optimizer (optim.large_batch) cannot continue the checkpoint's optimizer
state: it is refused before anything trains. `--samples` must be a multiple of the largest
branch batch, so every branch trains exactly the same samples (auto: the smallest such multiple
of at least one epoch).

Beside the result: the noise scale B_simple the run logged nearest before the checkpoint, and the
run's critical batch from its noise scale up to the checkpoint
(launcher.batchsize.advice.critical_batch).
Launcher overrides for the branches go after `--` (e.g. `-- trainer.cpu_threads=2`); the keys the
probe sets itself (BRANCH_KEYS: the batch, the checkpoint, the stop and its cooldown, the folder)
are refused there. A branch that diverges (exit 4 of a run) counts as an infinite loss.
Writes OUT/cbs.json (default OUT: RUN_DIR/cbs-step<N>) and prints a table. Bad input (also a run
folder, plan.json, metrics.jsonl or checkpoint that is not what the launcher writes): one line on
stderr, exit 2, nothing written; cbs.json that cannot be written: one line, exit 5.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn, cast

from launcher.backends import teardown
from launcher.batchsize.advice import critical_batch
from launcher.batchsize.branches import crossing, format_result
from launcher.batchsize.sweep import read_job
from launcher.checkpoint import files as checkpoint_files
from launcher.checkpoint.paths import WriteFailed, check_writable
from launcher.cluster.topology import from_env, slurm_env
from launcher.config.schema import ConcreteConfig, RunConfig, to_run_config
from launcher.errors import ConfigError, LauncherError
from launcher.planning.plan import PlanInput, plan_batch
from launcher.training.job import concrete, execute
from launcher.types.state import CheckpointState, SavedConfig

Branch = tuple[int, ConcreteConfig, float]  # k, the branch's config, its LR

PROG = "launcher.cbs"
BRANCH_KEYS = (  # set by the probe for every branch: an override of them is refused
    "global_batch",
    "global_batch_tokens",
    "run_dir",
    "resume",
    "plan_only",
    "checkpoint.allow_global_batch_change",
    "trainer.stop_after_samples",
    "trainer.stop_cooldown_samples",
)


def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(k) for k in text.split(",")]
    except ValueError:
        raise ConfigError(f"--k={text!r}: must be integers separated by commas") from None
    if ks[0] != 1 or any(b <= a for a, b in zip(ks, ks[1:], strict=False)):
        raise ConfigError(f"--k={text!r}: must start at 1 and ascend, e.g. 1,2,4,8,16")
    if len(ks) < 2:
        raise ConfigError(f"--k={text!r}: needs at least one k above 1")
    return ks


def pick_checkpoint(
    run_dir: Path, step: int | None
) -> tuple[CheckpointState, Path, list[dict[str, Any]]]:
    """The checkpoint to branch from (`step`'s, or the newest before the end of the run), its
    path, and the run's metrics records."""
    from launcher.checkpoint.resume import check_state  # heavy: torch

    if not run_dir.is_dir():
        raise ConfigError(f"{str(run_dir)!r}: no such directory")
    plan, records = read_job(run_dir)
    if "steps" not in plan:
        raise ConfigError(f"{str(run_dir / 'plan.json')!r}: not a plan (no integer steps)")
    end = plan["steps"]
    found = checkpoint_files.checkpoints(run_dir)  # each a NAME match
    steps = {int(_match(checkpoint_files.NAME, p.name).group(1)): p for p in found}
    if step is not None:
        if step not in steps:
            have = ", ".join(f"{s:,}" for s in sorted(steps)) or "none"
            raise ConfigError(f"--step={step}: no checkpoint of that step (there are: {have})")
        path = steps[step]
    else:
        inside = [s for s in steps if s < end]
        if not inside:
            raise ConfigError(
                f"{str(run_dir)!r}: no checkpoint before the end of the run (step {end:,}), where "
                "the LR is still up; train it with checkpoint.every_samples=N checkpoint.keep=M"
            )
        path = steps[max(inside)]
    try:
        loaded = checkpoint_files.load(path, lambda message: None, check_state)
    except checkpoint_files.Unusable as exc:
        raise ConfigError(str(exc)) from None
    if loaded is None:
        raise ConfigError(f"{str(path)!r}: not a usable checkpoint (digest or format)")
    return loaded[0], loaded[1], records


def branch_samples(requested: str, largest_batch: int, epoch_samples: int) -> int:
    """The samples every branch trains: `requested`, or auto (>= one epoch)."""
    if requested == "auto":
        return math.ceil(epoch_samples / largest_batch) * largest_batch
    try:
        samples = int(requested)
    except ValueError:
        raise ConfigError(f"--samples={requested!r}: must be an integer or auto") from None
    if samples <= 0 or samples % largest_batch:
        low = samples // largest_batch * largest_batch
        near = " or ".join(str(n) for n in (low, low + largest_batch) if n > 0)
        raise ConfigError(
            f"--samples={requested}: must be a positive multiple of the largest branch batch "
            f"{largest_batch}, so every branch trains the same samples; nearest: {near}"
        )
    return samples


def _match(pattern: re.Pattern[str], text: str) -> re.Match[str]:
    found = pattern.match(text)
    assert found is not None, text
    return found


def branch_config(
    saved: SavedConfig,
    batch: int,
    out: Path,
    checkpoint: Path,
    stop: int,
    cooldown: int,
    every_epochs: float,
    extra: list[str],
) -> RunConfig:
    """The RunConfig of one branch: the checkpoint's config, resumed at `batch`, ending at
    `stop` samples after a cooldown of `cooldown` samples, evaluated every `every_epochs` (at
    the end only when that is the branch's length)."""
    from omegaconf import OmegaConf  # on demand: --help need not load it

    node: dict[str, Any] = dict(copy.deepcopy(saved))
    node |= {"global_batch": batch, "run_dir": str(out), "resume": str(checkpoint)}
    node |= {"plan_only": False, "global_batch_tokens": None}  # the batch in samples, k x
    node["checkpoint"] |= {"allow_global_batch_change": True, "every_minutes": 0, "keep": 1}
    node["checkpoint"] |= {"every_samples": 0, "every_tokens": 0}
    node["trainer"] |= {"stop_after_samples": stop, "progress": False, "tensorboard": False}
    node["trainer"] |= {"eval_every_epochs": every_epochs, "stop_cooldown_samples": cooldown}
    node["trainer"]["noise_scale"] = False  # nothing to advise on: the branches are the measure
    if extra:
        try:
            merged = OmegaConf.merge(OmegaConf.create(node), OmegaConf.from_dotlist(extra))
        except Exception as exc:  # noqa: BLE001 - OmegaConf's errors: one line
            raise ConfigError(f"branch overrides {extra}: {exc}") from None
        node = cast(dict[str, Any], OmegaConf.to_container(merged, resolve=True))
    return to_run_config(node)


def noise_beside(
    records: list[dict[str, Any]], samples: int, batch: int
) -> dict[str, float | None]:
    """The run's logged B_simple nearest before `samples`, and its critical batch up to there."""
    train = [r for r in records if "loss" in r and r.get("samples", math.inf) <= samples]
    logged = [r["noise_scale"] for r in train if r.get("noise_scale") is not None]
    estimate = critical_batch(train, batch)
    return {
        "noise_scale_at_checkpoint": logged[-1] if logged else None,
        "run_critical_batch": estimate[0] if estimate else None,
    }


def _parser() -> argparse.ArgumentParser:
    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:  # one line and exit 2, as the launcher does
            raise ConfigError(message)

    parser = Parser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run folder with checkpoints")
    parser.add_argument(
        "--step",
        type=int,
        help="the checkpoint's step (default: the newest before the end of the run)",
    )
    parser.add_argument("--k", default="1,2,4,8,16", help="batch multiples (default 1,2,4,8,16)")
    parser.add_argument(
        "--samples",
        default="auto",
        help="samples per branch (default auto: "
        "one epoch, up to a multiple of the largest branch batch)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.05,
        help="relative eval-loss gap to the k=1 branch (default 0.05: on MNIST-1D branches "
        "below the critical batch differ by up to ~5-15%% from the chaos of training alone)",
    )
    parser.add_argument(
        "--cooldown",
        type=float,
        default=0.5,
        help="share of each branch's samples its LR falls to 0 over (default 0.5)",
    )
    parser.add_argument("--out", type=Path, help="default RUN_DIR/cbs-step<N>")
    parser.epilog = "Launcher overrides for the branches go after --, e.g. -- trainer.cpu_threads=2"
    return parser


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The options, and the launcher overrides for the branches (everything after `--`)."""
    cut = argv.index("--") if "--" in argv else len(argv)
    args, extra = _parser().parse_known_args(argv[:cut])
    stray = [a for a in extra if "=" in a and not a.startswith("-")]
    if stray:
        raise ConfigError(
            f"{stray[0]}: launcher overrides for the branches go after --, e.g. "
            f"python -m {PROG} RUN_DIR --k 1,2 -- {stray[0]}"
        )
    if extra:
        raise ConfigError(f"unrecognized arguments: {' '.join(extra)}")
    overrides = argv[cut + 1 :]
    for item in overrides:
        key, equals, _ = item.partition("=")
        if not equals or not re.fullmatch(
            r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key
        ):
            raise ConfigError(
                f"{item}: not a launcher override (KEY=VALUE with a dotted key, e.g. "
                "optim.weight_decay=0)"
            )
        if key in BRANCH_KEYS:
            raise ConfigError(
                f"{item}: the probe sets {key} for every branch; choose the branches with --k, "
                "--samples, --cooldown and --out"
            )
    return args, overrides


def prepare(
    argv: list[str],
) -> tuple[argparse.Namespace, CheckpointState, Path, list[Branch], int, Path]:
    """Check everything before a branch trains: (args, checkpoint state, its path, one
    RunConfig per k, the samples per branch, the output folder)."""
    args, overrides = parse(argv)
    from launcher.checkpoint.resume import check_optimizer  # heavy: torch

    ks = _parse_ks(args.k)
    if not 0 < args.tolerance < 1:
        raise ConfigError(f"--tolerance={args.tolerance}: must be in (0, 1)")
    if not 0 <= args.cooldown <= 1:
        raise ConfigError(f"--cooldown={args.cooldown}: must be in [0, 1]")
    state, path, records = pick_checkpoint(args.run_dir, args.step)
    ramp = state["config"].get("ramp")
    if isinstance(ramp, dict) and ramp.get("start_batch") is not None:
        raise ConfigError(
            f"{str(args.run_dir)!r}: trained with a batch ramp (ramp.start_batch), which a branch "
            "at another global batch cannot continue; probe a run at a fixed batch"
        )
    batch, done = state["global_batch"], state["consumed_samples"]
    saved_plan = state["plan"]
    samples = branch_samples(args.samples, ks[-1] * batch, saved_plan["epoch_samples"])
    stop, cooldown = done + samples, round(args.cooldown * samples)
    if stop >= saved_plan["total_samples"]:
        raise ConfigError(
            f"--samples={samples}: the branches would end at sample {stop:,}, not before the run's "
            f"end ({saved_plan['total_samples']:,}); use fewer samples or an earlier --step"
        )
    out = args.out or args.run_dir / f"cbs-step{state['step']}"
    if out.exists():
        raise ConfigError(f"--out={str(out)!r}: exists already; choose a new folder")
    check_writable(out, "--out")
    launched = from_env()
    configs = []
    for k in ks:
        every = saved_plan["total_samples"] / saved_plan["epoch_samples"]  # the end only
        branch = branch_config(
            state["config"], k * batch, out / f"k{k}", path, stop, cooldown, every, overrides
        )
        cfg = concrete(branch, launched)  # as the branch trains it (run_branches: execute)
        origin = (state["step"], done) if k > 1 else (0, 0)
        epoch = saved_plan["epoch_samples"]
        plan = plan_batch(PlanInput(cfg, launched.world_size, epoch, origin=origin))
        try:
            check_optimizer(state, plan, path)
        except ConfigError as exc:
            raise ConfigError(f"--k={args.k}: k={k}: {exc}") from None
        configs.append((k, cfg, plan.lr))
    args.beside = noise_beside(records, done, batch)  # before anything trains: a bad file
    return args, state, path, configs, samples, out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, state, path, configs, samples, out = prepare(argv)
        result = run_branches(args, state, path, configs, samples, out)
    except LauncherError as exc:  # bad input 2, a failed write 5, the k=1 branch diverged 4
        line = str(exc).removeprefix("launcher: error: ")
        print(f"{PROG}: error: {line}", file=sys.stderr, flush=True)
        return exc.exit_code
    finally:
        if "torch" in sys.modules:
            teardown()
    if result is not None:
        print(format_result(result), flush=True)
    return 0


def run_branches(
    args: argparse.Namespace,
    state: CheckpointState,
    path: Path,
    configs: list[Branch],
    samples: int,
    out: Path,
) -> dict[str, Any] | None:
    """Train every branch; rank 0 writes OUT/cbs.json and gets the result (others: None)."""
    from launcher.training.guard import Diverged  # heavy: torch

    os.environ.update(slurm_env(os.environ))
    launched = from_env()
    batch = state["global_batch"]
    losses, rows = [], []
    for k, cfg, lr in configs:
        row: dict[str, Any] = {"k": k, "global_batch": k * batch, "lr": lr}
        try:
            final = execute(cfg, launched, out / f"k{k}")
        except Diverged as exc:  # a measurement: this batch does not train at this LR
            if k == 1:
                raise Diverged(f"the k=1 branch diverged, nothing to compare with: {exc}") from None
            final = {"eval_loss": math.inf}
            row["diverged"] = str(exc)
        losses.append(final["eval_loss"])
        row["eval_loss"] = final["eval_loss"]
        if "eval_accuracy" in final:
            row["eval_accuracy"] = final["eval_accuracy"]
        rows.append(row)
    if launched.rank != 0:
        return None
    if not math.isfinite(losses[0]):
        raise Diverged(f"the k=1 branch's eval loss is {losses[0]}: nothing to compare with")
    found = crossing(batch, [k for k, _, _ in configs], losses, args.tolerance)
    for row, gap in zip(rows, found.gaps, strict=True):
        row["gap"] = gap
    result = {
        "run_dir": str(args.run_dir),
        "checkpoint": str(path),
        "step": state["step"],
        "consumed_samples": state["consumed_samples"],
        "global_batch": batch,
        "branch_samples": samples,
        "samples_trained": samples * len(configs),
        "tolerance": args.tolerance,
        "cooldown_samples": round(args.cooldown * samples),
        "branches": rows,
        "critical_batch": found.largest,
        "interpolated": found.interpolated,
        **args.beside,
    }
    _write_result(out / "cbs.json", result)
    return result


def _write_result(path: Path, result: dict[str, Any]) -> None:
    """cbs.json, atomically (a temporary file renamed): valid JSON, a non-finite number (a
    diverged branch's loss and gap) as null; a failed write is WriteFailed (exit 5)."""

    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        return [finite(v) for v in value] if isinstance(value, list) else value

    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(json.dumps(finite(result), indent=2, allow_nan=False) + "\n")
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise WriteFailed("the probe's result", path, exc) from None


if __name__ == "__main__":
    sys.exit(main())
