"""The finite-divergence rule (launcher/training/guard.py, trainer.diverge_factor) on real runs:
every recipe, healthy (its own LR) and diverging (its LR x 10^4), over seeds. A healthy run must
never be stopped; the table says how close each came (the largest median-of-20 / first-loss
ratio it reached) and which diverging runs the rule stopped, at which step.

    python bench/divergence.py --seeds 3 --steps 60 --out /tmp/divergence
    python bench/divergence.py --smoke   # seconds: MNIST-1D, one seed, healthy and diverging

The recipes run at CPU size (small data, small inputs, 60 steps: every step logged); their
optimizer, LR rule, warmup and schedule are the recipes' own. ResNet-50 and CIFAR-10 train on
data the bench generates (random images: their healthy loss stays near log(classes)), the GPT on
a generated text. Writes summary.json; the results go into bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

WINDOW = 20  # guard.WINDOW
QUIET = ["trainer.progress=false", "trainer.tensorboard=false", "checkpoint.every_minutes=0"]
QUIET += ["trainer.log_every=1", "memory.probe=false", "trainer.eval_every_epochs=1000"]


def cases(data: Path) -> dict[str, tuple[list[str], float]]:
    """recipe -> (overrides at CPU size, its base LR)."""
    images = ["data=synthetic", "data.input_shape=[3,32,32]", "data.num_classes=10"]
    images += ["data.eval_samples=64", "data.workers=0", "global_batch=64", "micro_batch=64"]
    return {
        "mnist1d": (["data.num_samples=8000"], 0.03),
        "gpt_small": (
            ["+recipe=gpt_small", f"data.path={data / 'corpus.txt'}", f"data.cache_dir={data}"]
            + ["model.layers=2", "model.width=64", "model.heads=2", "data.seq_len=64"]
            + ["global_batch=32", "micro_batch=32"],
            1e-3,
        ),
        "cifar10": (
            ["+recipe=cifar10", f"data.root={data / 'cifar'}", "data.verify=false"]
            + ["data.workers=0", "global_batch=64", "micro_batch=64"],
            0.1,
        ),
        "resnet50": (["+recipe=resnet50", *images], 0.1),
        "resnet50_lars": (["+recipe=resnet50_lars", *images], 31.2),
    }


def make_data(data: Path) -> None:
    """A text corpus and CIFAR-10 batch files (random images) the recipes can read offline."""
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = ["the", "batch", "size", "model", "token", "learning", "rate", "step", "loss"]
    text = " ".join(rng.choice(words, 60_000)) + "\n"
    (data / "corpus.txt").write_text(text)
    folder = data / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    for name in names:
        batch = {  # the official files' keys, as Python 2 pickles read under latin1
            "data": rng.integers(0, 256, (1000, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, 1000).tolist(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def ratio(losses: list[float]) -> float:
    """The largest median_low of WINDOW consecutive losses over the first loss (the rule's)."""
    if len(losses) <= WINDOW or losses[0] <= 0:
        return math.nan
    windows = (losses[i - WINDOW : i] for i in range(WINDOW + 1, len(losses) + 1))
    return max(statistics.median_low(w) for w in windows) / losses[0]


def one(overrides: list[str], out: Path, steps: int, seed: int) -> dict:
    """A run: its exit code, the step the rule stopped it at (or None), its largest ratio."""
    batch = next(
        int(o.split("=")[1])
        for o in [*overrides[::-1], "global_batch=512"]
        if o.startswith("global_batch=")
    )
    cmd = [sys.executable, "-m", "launcher", *overrides, *QUIET, f"seed={seed}"]
    cmd += [f"trainer.samples={steps * batch}", f"run_dir={out}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    (out.parent / f"{out.name}.log").write_text(done.stdout + done.stderr)
    lines = (out / "metrics.jsonl").read_text().splitlines() if out.exists() else []
    records = [json.loads(x) for x in lines if x.strip()]
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    stopped = [r for r in records if r.get("event") == "diverged"]
    rule = None  # which rule stopped it: non-finite steps in a row, or the loss that stayed up
    if stopped:
        rule = "finite" if "stayed above" in stopped[0]["why"] else "non-finite"
    return {
        "code": done.returncode,
        "stopped": stopped[0]["step"] if stopped else None,
        "rule": rule,
        "ratio": ratio(losses),
        "steps": len(losses),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--factor", type=float, default=1e4, help="the diverging runs' LR x")
    parser.add_argument("--healthy", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--recipes", default="mnist1d,gpt_small,cifar10,resnet50,resnet50_lars")
    parser.add_argument("--smoke", action="store_true", help="one tiny run of each kind")
    parser.add_argument("--out", type=Path, help="required but with --smoke (a temporary folder)")
    args = parser.parse_args()
    if args.out is None and not args.smoke:
        parser.error("--out is required")
    with tempfile.TemporaryDirectory(prefix="bench-divergence-") as tmp:
        run(args, args.out or Path(tmp))


def run(args: argparse.Namespace, out: Path) -> None:
    make_data(out / "data")
    table = cases(out / "data")
    recipes = ["mnist1d"] if args.smoke else args.recipes.split(",")
    seeds, steps = (1, WINDOW + 5) if args.smoke else (args.seeds, args.steps)
    summary = {}
    head = f"{'recipe':<14} {'run':<10} {'seed':>4} {'exit':>4} {'stopped at':>10} {'by':>10}"
    print(f"{head} {'ratio':>10}")
    for recipe in recipes:
        overrides, lr = table[recipe]
        kinds = [("diverging", [f"optim.base_lr={lr * args.factor:g}"])]
        for kind, extra in [("healthy", [])] * args.healthy + kinds:
            for seed in range(seeds):
                run_dir = out / f"{recipe}-{kind}-{seed}"
                got = one([*overrides, *extra], run_dir, steps, seed)
                summary[run_dir.name] = got
                stop = "-" if got["stopped"] is None else str(got["stopped"])
                print(
                    f"{recipe:<14} {kind:<10} {seed:>4} {got['code']:>4} {stop:>10} "
                    f"{got['rule'] or '-':>10} {got['ratio']:>10.3g}",
                    flush=True,
                )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    healthy_stopped = [k for k, v in summary.items() if "healthy" in k and v["code"] != 0]
    if healthy_stopped:
        sys.exit(f"healthy runs that did not finish: {healthy_stopped}")
    broken = [k for k, v in summary.items() if v["code"] not in (0, 4)]  # 4: stopped, diverged
    if args.smoke and broken:
        sys.exit(f"runs that failed (not 0, not diverged): {broken}")


if __name__ == "__main__":
    main()
