"""Input pipeline of the language-model example: how long the training loop waits on its stream.

examples/lm is copied into a temporary folder and prepared there (prepare.py: the standard
library's docstrings, a byte-level BPE tokenizer), then trained by the launcher on one process as
its README says (`python -m launcher --config-dir conf +recipe=pydocs`), once per --workers value
(`data.workers`: 0 reads, tokenizes and packs the Hugging Face stream in the training process; N
in N DataLoader worker processes, each reading the whole stream and keeping its share).

Each run's metrics.jsonl has the launcher's own measure, `data_wait` in every metrics line: the
share of the training time since the line before that the loop spent waiting for micro-batches
(launcher/training/loop.py); the whole run's share is their sum weighted by each interval's
training seconds, over the run's training seconds (`train_s`: evaluation and checkpoints excluded,
so reading the evaluation stream is not counted). To see what the waits are made of, the child
process that runs the launcher also wraps the loop's training batches (the iterator the loop calls
`next()` on for every micro-batch, launcher/training/phases.py `_feed`) in a timer of its own:
every wait, so their median, their longest, and the first one (a DataLoader's workers starting,
the stream opened, the first packs read) apart from the steady state. The noise scale is off
(its split steps and the advice's timings are not the pipeline); everything else is the recipe's.

    python bench/input_wait.py [--workers 0,2] [--repeats 2] [--out x.json]
    python bench/input_wait.py --smoke     # seconds: 16 steps, workers 0 and 1, no evaluation
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lm"
STALL = 0.05  # a wait longer than this many seconds is counted as a stall (a step takes ~70 ms)


class Timed:
    """An iterator of batches whose `next()` durations are kept in `waits`."""

    def __init__(self, batches: Any, waits: list[float]) -> None:
        self._it, self.waits = iter(batches), waits

    def __iter__(self) -> Timed:
        return self

    def __next__(self) -> Any:
        start = time.perf_counter()
        try:
            return next(self._it)
        finally:
            self.waits.append(time.perf_counter() - start)


def child(project: Path, workers: int, overrides: list[str]) -> dict[str, Any]:
    """Train the example in this process with its batches timed; the waits and the run's metrics."""
    os.chdir(project)
    sys.path.insert(0, str(project))
    from launcher.cli import main
    from launcher.training import phases

    waits: list[float] = []
    feed = phases._feed

    def timed_feed(job: Any) -> Any:
        made = feed(job)
        train = made.train
        return dataclasses.replace(made, train=lambda plan, step: Timed(train(plan, step), waits))

    phases._feed = timed_feed
    run_dir = project / f"run-workers{workers}"
    args = ["--config-dir", "conf", "+recipe=pydocs", f"run_dir={run_dir}"]
    args += [f"data.workers={workers}", "trainer.progress=false", "trainer.noise_scale=false"]
    code = main([*args, *overrides])
    if code:
        raise SystemExit(f"the run with data.workers={workers} exited {code}")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(run_dir)
    logged = [m for m in lines if "data_wait" in m]  # each: the share since the line before
    before = [0.0] + [m["train_s"] for m in logged[:-1]]
    losses = [m["eval_loss"] for m in lines if "eval_loss" in m]
    return {
        "workers": workers,
        "waits": waits,
        "train_s": logged[-1]["train_s"],
        "steps": logged[-1]["step"],
        "data_wait": [m["data_wait"] for m in logged],
        "data_wait_s": sum(
            m["data_wait"] * (m["train_s"] - t) for m, t in zip(logged, before, strict=True)
        ),
        "eval_loss": losses[-1:],
    }


def summary(r: dict[str, Any]) -> dict[str, Any]:
    """The waits of one run, in seconds and as fractions of its training seconds."""
    first, rest = r["waits"][0], r["waits"][1:]
    train = r["train_s"]
    return {
        "workers": r["workers"],
        "steps": r["steps"],
        "train_s": train,
        "launcher_wait_fraction": r["data_wait_s"] / train,
        "launcher_median_data_wait": statistics.median(r["data_wait"][1:]),
        "first_wait_s": first,
        "steady_wait_s": sum(rest),
        "steady_wait_fraction": sum(rest) / train,
        "total_wait_fraction": (first + sum(rest)) / train,
        "median_wait_ms": 1e3 * statistics.median(rest),
        "max_wait_ms": 1e3 * max(rest),
        "stalls": sum(w > STALL for w in rest),
        "stalls_s": sum(w for w in rest if w > STALL),
        "step_ms": 1e3 * train / r["steps"],
        "eval_loss": r["eval_loss"],
    }


def run_child(project: Path, workers: int, overrides: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", str(project), "--workers", str(workers), "--"]
    done = subprocess.run([*cmd, *overrides], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"workers={workers}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", default="0,2", help="data.workers values, comma-separated")
    parser.add_argument("--repeats", type=int, default=1, help="runs per workers value")
    parser.add_argument("--smoke", action="store_true", help="16 steps, workers 0 and 1")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="launcher overrides after --")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, int(args.workers), args.overrides)))
        return
    overrides = list(args.overrides)
    if args.smoke:
        args.workers, args.repeats = "0,1", 1
        overrides += ["trainer.tokens=32768", "trainer.eval_every_epochs=100"]
    counts = [int(w) for w in args.workers.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="input-wait-") as tmp:
        project = Path(shutil.copytree(EXAMPLE, Path(tmp) / "lm"))
        shutil.rmtree(project / "data", ignore_errors=True)  # a copy's own prepared data
        subprocess.run([sys.executable, "prepare.py", "data"], cwd=project, check=True)
        for _ in range(args.repeats):
            for w in counts:  # interleaved: a shared machine's drift hits every count alike
                rows.append(summary(run_child(project, w, overrides)))
    print(
        f"# {len(os.sched_getaffinity(0))} usable cores, load average at the end "
        f"{os.getloadavg()[0]:.1f}; launcher overrides: {' '.join(overrides) or 'none'}"
    )
    print(
        "| data.workers | steps | training s | data_wait, whole run | data_wait, median "
        "interval | timed: all waits / training | first batch s | steady waits / training | "
        "median wait ms | max wait ms | waits > 50 ms (their s) | ms per step | final eval loss |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        loss = f"{r['eval_loss'][0]:.4f}" if r["eval_loss"] else "-"
        print(
            f"| {r['workers']} | {r['steps']} | {r['train_s']:.1f} | "
            f"{r['launcher_wait_fraction']:.1%} | {r['launcher_median_data_wait']:.1%} | "
            f"{r['total_wait_fraction']:.1%} | {r['first_wait_s']:.2f} | "
            f"{r['steady_wait_fraction']:.1%} | {r['median_wait_ms']:.2f} | "
            f"{r['max_wait_ms']:.0f} | {r['stalls']} ({r['stalls_s']:.2f}) | {r['step_ms']:.1f} | "
            f"{loss} |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"overrides": overrides, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
