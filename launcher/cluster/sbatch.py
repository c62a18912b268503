"""sbatch scripts from slurm/ for the configured cluster: the shape and resources from the
same `cluster` config the job checks its allocation against, every line checked before it is
written (launcher/slurm.py is the command that renders and submits one)."""

from __future__ import annotations

import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

from launcher.config.checks import TARGET_KEY
from launcher.config.components import DataConfig
from launcher.config.compose import config_dir_args, hydra_quote
from launcher.config.placement import ClusterConfig, SlurmConfig
from launcher.config.resources import slurm_dir
from launcher.config.schema import RunConfig, to_dict
from launcher.errors import ConfigError

SBATCH_SPECIAL = "'\"\\#"  # what sbatch reads in an #SBATCH line besides whitespace (sbatch_option)


def template_name(cluster: ClusterConfig, slurm: SlurmConfig) -> str:
    """slurm.template, with auto = single_node on one node, else multi_node (torchrun)."""
    nodes = cluster.nodes
    name = slurm.template
    if name == "auto":
        return "single_node" if nodes == 1 else "multi_node"
    if name == "single_node" and nodes != 1:
        raise ConfigError(
            f"slurm.template='single_node': cluster={cluster.name!r} has {nodes} nodes; use "
            "multi_node or multi_node_srun"
        )
    return name


def check_shape(c: ClusterConfig) -> None:
    """A Slurm job needs the cluster's shape and device kind spelled out."""
    for key in ("nodes", "devices_per_node"):
        if getattr(c, key) == "auto":
            raise ConfigError(
                f"cluster.{key}=auto: a Slurm job needs the cluster's shape; choose "
                "cluster=NAME or set cluster.nodes and cluster.devices_per_node"
            )
    if c.device == "auto":
        raise ConfigError("cluster.device=auto: say cpu or cuda for the job's nodes")


def resources(
    c: ClusterConfig, s: SlurmConfig, data: DataConfig, tasks_per_node: int
) -> dict[str, str]:
    """CPUs and host memory a job asks for, as sbatch options ({name: value}, '' for a flag)."""
    per_task = int(c.devices_per_node) // tasks_per_node
    workers = getattr(data, "workers", 0)
    cpus = per_task * (1 + workers) if s.cpus_per_task == "auto" else s.cpus_per_task
    found = {"cpus-per-task": str(cpus)}
    if s.mem_per_gpu is not None:
        if c.device != "cuda":
            raise ConfigError(
                f"slurm.mem_per_gpu={s.mem_per_gpu!r}: cluster={c.name!r} has no GPUs; use "
                "slurm.mem"
            )
        found["mem-per-gpu"] = s.mem_per_gpu
    elif s.mem == "auto":
        size = c.device_memory_gb
        if c.device == "cuda" and size != "auto":
            found["mem-per-gpu"] = f"{math.ceil(size)}G"
        elif c.device == "cpu" and size != "auto":
            found["mem"] = f"{math.ceil(int(c.devices_per_node) * size)}G"
        else:
            found["mem"] = "0"
    elif s.mem is not None:
        found["mem"] = s.mem
    if s.exclusive:
        found["exclusive"] = ""
    return found


def directives(cfg: RunConfig, run_dir: Path, workdir: Path) -> list[str]:
    """The sbatch options for `cfg`'s cluster and slurm settings."""
    c, s = cfg.cluster, cfg.slurm
    check_shape(cfg.cluster)
    if "\\" in str(run_dir):  # Slurm's filename patterns: a \ anywhere turns %j off and is dropped
        raise ConfigError(
            f"run_dir={str(run_dir)!r}: holds a backslash, which Slurm's --output cannot name "
            "(a \\ in it is dropped and turns off %j); choose a folder without one"
        )
    srun = template_name(cfg.cluster, cfg.slurm) == "multi_node_srun"
    tasks = int(c.devices_per_node) if srun else 1  # check_shape: an int
    options = [f"--job-name=launcher-{cfg.recipe}", f"--nodes={c.nodes}"]
    options.append(f"--ntasks-per-node={tasks}")
    if c.device == "cuda":
        options.append(f"--gpus-per-node={c.devices_per_node}")
    options += [
        f"--{k}={v}" if v else f"--{k}"
        for k, v in resources(cfg.cluster, cfg.slurm, cfg.data, tasks).items()
    ]
    output = str(run_dir).replace("%", "%%")  # sbatch expands %j, %x ... in it; %% is a %
    options += [f"--time={s.time}", f"--chdir={workdir}", f"--output={output}/slurm-%j.out"]
    options += [f"--partition={s.partition}"] if s.partition else []
    options += [f"--account={s.account}"] if s.account else []
    options += [f"--signal=USR1@{s.signal_seconds}"] if s.signal_seconds else []
    return [*options, "--requeue", "--open-mode=append", *s.extra]


def render(template: str, options: list[str], setup: list[str]) -> str:
    """`template` with its #SBATCH lines replaced by `options` and `setup` lines after them."""
    lines = template.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    kept = [line for line in lines[first:] if not line.startswith("#SBATCH")]
    header = [f"#SBATCH {option}" for option in options]
    return "\n".join([*lines[:first], *header, *setup, *kept]) + "\n"


def _targets(node: object) -> list[str]:
    """Every `_target_` in a config node (nested ones too)."""
    if isinstance(node, dict):
        own = [node[TARGET_KEY]] if isinstance(node.get(TARGET_KEY), str) else []
        return own + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


def python_path(cfg: RunConfig, workdir: Path) -> list[str]:
    """Folders the job must have on PYTHONPATH to import the config's `_target_`s: those that
    provide them from outside the installed packages and the job's working directory."""
    import importlib.util
    import sysconfig

    installed = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    folders: list[str] = []
    for target in _targets(to_dict(cfg)):
        if target.startswith("launcher."):
            continue
        top = target.split(".")[0]
        spec = importlib.util.find_spec(top)
        if spec is None or spec.origin in (None, "built-in", "frozen"):
            continue  # not importable here: the plan, made next, refuses it in one line
        origin = Path(spec.origin).resolve()
        folder = origin.parent.parent if spec.submodule_search_locations else origin.parent
        if folder in installed or folder == workdir.resolve() or str(folder) in folders:
            continue
        if Path(sysconfig.get_paths()["stdlib"]).resolve() in (folder, *folder.parents):
            continue
        folders.append(str(folder))
    return folders


def job_script(
    cfg: RunConfig,
    overrides: list[str],
    run_dir: Path,
    workdir: Path,
    config_dir: Path | None = None,
) -> str:
    """The rendered job.sbatch text."""
    name = template_name(cfg.cluster, cfg.slurm)
    args = [o for o in overrides if not o.startswith("run_dir=")]
    args.append(f"run_dir={hydra_quote(str(run_dir))}")
    args = config_dir_args(config_dir) + args
    c = cfg.cluster
    setup = [
        f"# Rendered by python -m launcher.slurm from slurm/{name}.sbatch for cluster={c.name} "
        f"({c.nodes} node(s) x {c.devices_per_node} {c.device} device(s)) on "
        f"{time.strftime('%Y-%m-%d %H:%M')}.",
        f"export LAUNCHER_PYTHON={shlex.quote(sys.executable)}",
        f"export LAUNCHER_DEVICES_PER_NODE={c.devices_per_node}",
    ]
    folders = python_path(cfg, workdir)
    if folders:
        joined = shlex.quote(":".join(folders))
        setup.append(f'export PYTHONPATH={joined}"${{PYTHONPATH:+:$PYTHONPATH}}"')
    setup.append("set -- " + " ".join(shlex.quote(a) for a in args) + ' "$@"')
    options = [sbatch_option(o) for o in directives(cfg, run_dir, workdir)]
    for line in [*options, *setup]:  # every value that reaches the script, in its context
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in line):
            raise ConfigError(
                f"a value for the sbatch script holds a control character: {line!r}; it cannot "
                "be written safely"
            )
    template = (slurm_dir() / f"{name}.sbatch").read_text()
    return render(template, options, setup)


def sbatch_option(option: str) -> str:
    """An option as an #SBATCH line must hold it. sbatch reads the line as words (Slurm's
    src/sbatch/opt.c, get_argument): whitespace splits them, a `'` or `"` opens a quote that the
    same character closes, `\\` makes the next character literal, an unquoted `#` ends the line.
    So a value holding any of these goes in double quotes with `\\` and `"` escaped
    (--output="/runs/it's here/slurm-%j.out"), read the same by every Slurm version (a `\\ ` for
    a space only from 24.05). A newline cannot be said at all (job_script refuses it)."""
    name, eq, value = option.partition("=")
    if not eq or not any(ch.isspace() or ch in SBATCH_SPECIAL for ch in value):
        return option
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'{name}="{escaped}"'


def submit(script: Path) -> str:
    """`sbatch --parsable SCRIPT`; the job id."""
    try:
        done = subprocess.run(
            ["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120
        )
    except OSError as exc:
        raise ConfigError(f"--submit: cannot run sbatch ({exc}); submit {script} by hand") from None
    if done.returncode:
        raise ConfigError(f"--submit: sbatch refused {script}: {done.stderr.strip()}")
    return done.stdout.strip().split(";")[0]
