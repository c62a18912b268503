"""The adaptive batch ramp against fixed batches: optimizer steps and training time to a target
accuracy, over seeds, in one run on one machine (issue 18, part 2).

    python bench/ramp.py --out /tmp/ramp --seeds 3 --target 0.97 --jobs 2 \
        --fixed 32,64,128,256,512,1024,2048 --adaptive 512:1,512:0.25,2048:1 [-- overrides]
    python bench/ramp.py --smoke   # seconds: fixed 512 and adaptive 32 -> 512, seed 0, 0.5 epoch

Every configuration is one `python -m launcher -m seed=0,...` sweep of the recipe, evaluated
every trainer.eval_every_epochs=0.25 (checkpoints, TensorBoard and the progress bar off; the noise
meter on, as runs train by default). `--adaptive CAP:FACTOR` runs ramp.mode=adaptive from
--start with global_batch=CAP and ramp.noise_factor=FACTOR. Per configuration: the median over
seeds of the steps, samples and training seconds (train_s: evaluation excluded) at the first
evaluation reaching --target (a seed that never reaches it counts as never), and the final
accuracies. Prints a table and writes summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

QUIET = ["trainer.progress=false", "trainer.tensorboard=false", "checkpoint.every_minutes=0"]


def to_target(metrics: Path, target: float) -> dict:
    """Steps, samples and train_s at the first evaluation >= target; the final accuracy."""
    lines = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    evals = [r for r in lines if "eval_accuracy" in r and "event" not in r]
    hit = next((r for r in evals if r["eval_accuracy"] >= target), None)
    ramp = [r["global_batch"] for r in lines if r.get("event") == "ramp"]
    return {
        "steps": hit["step"] if hit else math.inf,
        "samples": hit["samples"] if hit else math.inf,
        "seconds": hit["train_s"] if hit else math.inf,
        "final": evals[-1]["eval_accuracy"] if evals else 0.0,
        "ramp": ramp,
    }


def sweep(name: str, args: list[str], seeds: int, out: Path, target: float) -> list[dict]:
    run_dir = out / name
    seed_list = ",".join(str(s) for s in range(seeds))
    cmd = [sys.executable, "-m", "launcher", "-m", f"seed={seed_list}", f"run_dir={run_dir}"]
    cmd += ["trainer.eval_every_epochs=0.25", *QUIET, *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    (out / f"{name}.log").write_text(done.stdout + done.stderr)
    return [to_target(run_dir / str(s) / "metrics.jsonl", target) for s in range(seeds)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="required but with --smoke (a temporary folder)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--fixed", default="32,64,128,256,512,1024,2048")
    parser.add_argument("--adaptive", default="512:1,512:0.25,2048:1")
    parser.add_argument("--start", type=int, default=32)
    parser.add_argument("--smoke", action="store_true", help="fixed 512, adaptive 512:1, 0.5 epoch")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.out is None and not args.smoke:
        parser.error("--out is required")
    if args.smoke:  # the adaptive run's first stages: 32 samples a step, min_steps 5
        args.seeds, args.fixed, args.adaptive, args.target = 1, "512", "512:1", 0.5
        args.overrides = [*args.overrides, "trainer.epochs=0.5", "ramp.min_steps=5"]
    with tempfile.TemporaryDirectory(prefix="bench-ramp-") as tmp:
        args.out = args.out or Path(tmp)
        run(args)


def run(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    configs = {f"fixed-{b}": [f"global_batch={b}"] for b in args.fixed.split(",") if b}
    for spec in filter(None, args.adaptive.split(",")):
        cap, factor = spec.split(":")
        configs[f"adaptive-{cap}-x{factor}"] = [
            f"global_batch={cap}",
            "ramp.mode=adaptive",
            f"ramp.start_batch={args.start}",
            f"ramp.noise_factor={factor}",
        ]

    def one(item: tuple[str, list[str]]) -> list[dict]:
        name, extra = item
        return sweep(name, [*extra, *args.overrides], args.seeds, args.out, args.target)

    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(configs, pool.map(one, configs.items()), strict=True))
    print(f"target {args.target:g}, seeds 0-{args.seeds - 1}; median over seeds (inf: not reached)")
    print("| configuration | steps to target | samples | training s | final accuracy | batches |")
    print("|---|---|---|---|---|---|")
    for name, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in ("steps", "samples", "seconds")}
        finals = " / ".join(f"{100 * r['final']:.2f}" for r in runs)
        ramp = " ".join("->".join(map(str, r["ramp"])) or "-" for r in runs[:1])
        print(
            f"| {name} | {med['steps']:,.0f} | {med['samples']:,.0f} | {med['seconds']:.2f} | "
            f"{finals} | {ramp} |"
        )
    (args.out / "summary.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    failed = [name for name, runs in results.items() if any(not r["final"] for r in runs)]
    if args.smoke and failed:  # a run without an evaluation: its sweep failed
        for name in failed:
            print((args.out / f"{name}.log").read_text()[-3000:], file=sys.stderr)
        sys.exit(f"runs without an evaluation: {failed}")


if __name__ == "__main__":
    main()
