"""Large-batch quality on MNIST-1D: does the launcher's default policy keep B512 near B32?

Runs the real CLI (`python -m launcher ...`) for each config and seed, two processes at a time
(one torch thread each), and prints a markdown table of final test accuracy.

    python bench/quality.py [--seeds 0 1 2] [--epochs 20] [--only B2048] [--out FILE.json]
    python bench/quality.py --smoke   # seconds: B512 and B2048, seed 0, 0.1 epoch (a few steps)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CONFIGS = {
    "B32 reference (lr 0.03)": ["global_batch=32"],
    "B512 launcher default policy": ["global_batch=512"],
    "B2048 launcher default policy (LAMB swap)": ["global_batch=2048"],
    "B512 no scaling, no warmup": [
        "global_batch=512",
        "optim.scaling=none",
        "schedule.warmup_epochs=0",
    ],
}


def run_one(name: str, overrides: list[str], seed: int, epochs: float, work: Path) -> float:
    run_dir = work / f"{abs(hash(name)) % 10**8}-{seed}"
    cmd = [
        sys.executable,
        "-m",
        "launcher",
        *overrides,
        f"seed={seed}",
        f"trainer.epochs={epochs}",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        f"run_dir={run_dir}",
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "eval_accuracy" in m][-1]["eval_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, default=20)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--only", default="", help="run the configs whose name contains this")
    parser.add_argument("--smoke", action="store_true", help="B512, B2048: seed 0, 0.1 epoch")
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.epochs = [0], 0.1
    configs = {k: v for k, v in CONFIGS.items() if args.only in k}
    if args.smoke:  # two at a time, as always; the B2048 run swaps to LAMB
        configs = {k: v for k, v in configs.items() if "default policy" in k}
    jobs = [(name, ov, s) for name, ov in configs.items() for s in args.seeds]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(2) as pool:
        accs = list(pool.map(lambda j: run_one(*j, args.epochs, Path(tmp)), jobs))
    results: dict[str, list[float]] = {}
    for (name, _, _), acc in zip(jobs, accs, strict=True):
        results.setdefault(name, []).append(acc)
    print(f"| config | test accuracy % (seeds {', '.join(map(str, args.seeds))}) | mean |")
    print("|---|---|---|")
    for name, values in results.items():
        per_seed = " / ".join(f"{100 * v:.2f}" for v in values)
        print(f"| {name} | {per_seed} | {100 * statistics.mean(values):.2f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
