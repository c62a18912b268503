"""Does a large-batch policy hold across seeds? A recipe at several global batches, each over
several seeds: the final evaluation accuracy's min and mean per batch (issue 18's bar on MNIST-1D
at 20 epochs: min >= 97.3%, mean >= 97.8% at every batch from 32 to 2048), or with `--metric loss`
the final evaluation loss's max (the worst seed) and mean.

    python bench/seeds.py --batches 32,64,128,256,512,1024,2048 --seeds 8 --jobs 2 \
        --out /tmp/seeds [-- launcher overrides, e.g. optim.clip_grad_norm=1.0]
    python bench/seeds.py --metric loss --batches 16,256 --seeds 3 --out /tmp/gpt -- \
        +recipe=gpt_small ...   # another recipe: its overrides after --
    python bench/seeds.py --smoke   # seconds: batch 512, seeds 0-1, 0.1 epoch, a temporary --out

One `python -m launcher -m seed=0,...` sweep per batch (`--jobs` of them at a time; the recipe's
trainer.cpu_threads=1 keeps them from sharing a core); checkpoints, TensorBoard and the progress
bar off (they do not change what is trained). The noise meter stays on as in a default run: its
split steps change the float rounding, and with it a chaotic trajectory, so a policy is judged as
users run it (`trainer.noise_scale=false` after `--` to judge it without). Prints a table and writes
summary.json.
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


def sweep(batch: int, seeds: int, out: Path, extra: list[str], metric: str) -> list[float]:
    """Final eval accuracy (or loss) of each seed at `batch`; a run that failed counts as
    accuracy 0 (loss inf)."""
    run_dir = out / f"b{batch}"
    seed_list = ",".join(str(s) for s in range(seeds))
    cmd = [sys.executable, "-m", "launcher", "-m", f"seed={seed_list}"]
    cmd += [f"global_batch={batch}", f"run_dir={run_dir}", *QUIET, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    (out / f"b{batch}.log").write_text(done.stdout + done.stderr)
    key = f'"eval_{metric}"'
    values = []
    for seed in range(seeds):
        metrics = run_dir / str(seed) / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        evals = [json.loads(x)[f"eval_{metric}"] for x in lines if key in x]
        values.append(evals[-1] if evals else (0.0 if metric == "accuracy" else math.inf))
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="32,64,128,256,512,1024,2048")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, help="required but with --smoke (a temporary folder)")
    parser.add_argument("--metric", choices=("accuracy", "loss"), default="accuracy")
    parser.add_argument("--smoke", action="store_true", help="batch 512, 2 seeds, 0.1 epoch")
    parser.add_argument("overrides", nargs="*", help="launcher overrides (after --)")
    args = parser.parse_args()
    if args.out is None and not args.smoke:
        parser.error("--out is required")
    if args.smoke:
        args.batches, args.seeds = "512", 2
        args.overrides = [*args.overrides, "trainer.epochs=0.1"]
    with tempfile.TemporaryDirectory(prefix="bench-seeds-") as tmp:
        args.out = args.out or Path(tmp)
        run(args)


def run(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    extra = args.overrides
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(
            zip(
                batches,
                pool.map(lambda b: sweep(b, args.seeds, args.out, extra, args.metric), batches),
                strict=True,
            )
        )
    print(f"overrides: {' '.join(args.overrides) or '(recipe defaults)'}; seeds 0-{args.seeds - 1}")
    loss = args.metric == "loss"
    worst, show = (max, "{:.4f}".format) if loss else (min, lambda a: f"{100 * a:.2f}")
    print(f"| global batch | {'max' if loss else 'min'} | mean | per seed |")
    print("|---|---|---|---|")
    for batch, values in results.items():
        per_seed = " / ".join(show(a) for a in values)
        print(f"| {batch} | {show(worst(values))} | {show(statistics.mean(values))} | {per_seed} |")
    summary = {"overrides": args.overrides, args.metric: {str(b): a for b, a in results.items()}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    failed = [b for b, values in results.items() if 0.0 in values or math.inf in values]
    if args.smoke and failed:  # a run that failed counts as accuracy 0 (loss inf)
        for batch in failed:
            print((args.out / f"b{batch}.log").read_text()[-3000:], file=sys.stderr)
        sys.exit(f"runs failed at global batch {failed}")


if __name__ == "__main__":
    main()
