"""Render an sbatch script from slurm/ for the configured cluster, and optionally submit it.

    python -m launcher.slurm [--submit] [--config-dir DIR] [+recipe=NAME] cluster=NAME [key=value]

The #SBATCH node, task and GPU counts are written from the same `cluster` config that the job
checks its Slurm allocation against at start (topology.resolve), so the script and the plan's
world size cannot disagree; time, partition, account, the preemption signal and extra options
come from `slurm.*`. The plan is made and checked first (bad input: one line, exit 2, nothing
written). The script goes to the run directory as job.sbatch, with the overrides, the absolute
--config-dir and run_dir baked in, so a requeued job resumes where it stopped; when your
`_target_`s import from a folder outside site-packages and the working directory, the script
puts that folder on PYTHONPATH.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from launcher.cluster.sbatch import job_script, submit
from launcher.cluster.topology import Topology
from launcher.config.compose import compose_run, split_config_dir
from launcher.errors import ConfigError
from launcher.planning.render import format_plan
from launcher.training.job import concrete, estimated_plan
from launcher.training.run_folder import job_run_dir, run_stamp

USAGE = __doc__.split("\n\n")[1]


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(f"usage:\n{USAGE}")
        return 0
    try:
        config_dir, overrides = split_config_dir([a for a in args if a != "--submit"])
        flags = [a for a in overrides if a.startswith("-")]
        if flags:
            raise ConfigError(
                f"{flags[0]}: unknown option; options are --submit, --config-dir DIR and -h/--help"
            )
        cfg = dataclasses.replace(compose_run(overrides, config_dir), plan_only=True)
        workdir = Path.cwd()
        run_dir = (workdir / job_run_dir(cfg.run_dir, cfg.recipe, run_stamp(), None)).resolve()
        text = job_script(cfg, overrides, run_dir, workdir, config_dir)
        launched = Topology(1, 0, 0, 1, cfg.cluster.device)
        _, plan = estimated_plan(concrete(cfg, launched), launched)
        run_dir.mkdir(parents=True, exist_ok=True)
        script = run_dir / "job.sbatch"
        script.write_text(text)
        print(format_plan(plan), f"\nsbatch script written to {script}", sep="\n", flush=True)
        if "--submit" in args:
            print(f"submitted Slurm job {submit(script)}", flush=True)
        else:
            print(f"submit it with: sbatch {script}", flush=True)
    except ConfigError as exc:
        print(f"launcher: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
