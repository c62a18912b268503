"""Start-up: wall time of `python -m launcher plan_only=true` against `python -c "import torch"`.

plan_only does everything a run does before its first step except building the data and the
model on the device: compose the Hydra config, validate it, resolve the topology, estimate the
memory with fake tensors, plan, write config.yaml and plan.json, print the plan. Importing torch
is the floor any PyTorch tool pays. The two commands alternate, each in a fresh process with a
fresh run directory; the ratio of the medians is the result (issue 9 target: <= 1.3).

    python bench/startup.py [--repeats 9] [-- LAUNCHER ARGS ...]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wall(cmd: list[str], cwd: str) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("args", nargs="*", help="more launcher arguments (after --)")
    args = parser.parse_args()
    floor = [sys.executable, "-c", "import torch"]
    times: dict[str, list[float]] = {"import torch": [], "plan_only": []}
    with tempfile.TemporaryDirectory() as tmp:
        wall(floor, tmp)  # warm the file cache for both
        for i in range(args.repeats + 1):
            launcher = [sys.executable, "-m", "launcher", "plan_only=true", f"run_dir=run{i}"]
            t_floor = wall(floor, tmp)
            t_plan = wall([*launcher, *args.args], tmp)
            if i:  # the first pair warms the caches (Hydra, the memory estimate's imports)
                times["import torch"].append(t_floor)
                times["plan_only"].append(t_plan)
    for name, runs in times.items():
        print(
            f"{name:>12}: median {statistics.median(runs):.3f} s (runs: "
            + ", ".join(f"{t:.2f}" for t in runs)
            + ")"
        )
    ratio = statistics.median(times["plan_only"]) / statistics.median(times["import torch"])
    print(f"ratio plan_only / import torch = {ratio:.3f} (medians)")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
