"""The branched critical-batch probe (python -m launcher.cbs) against the sweep's fitted B_crit,
over seeds (issue 18, part 3: within 1.5x of the B_crit that `python -m launcher.report` fitted
to the 8-batch MNIST-1D sweep, 407, at less cost than that sweep).

    python bench/cbs.py --out /tmp/cbs --seeds 3 --batch 32 --at 96000 \
        --k 1,2,4,8,16 --samples 131072 --tolerance 0.05 [-- launcher overrides]
    python bench/cbs.py --smoke   # seconds: seed 0, a checkpoint at 3,200 samples, k 1 and 2

Per seed: one run of the recipe at --batch that stops at --at samples with a checkpoint there
(trainer.stop_after_samples), then the probe from that checkpoint. Prints, per seed, every
branch's gap, the critical batch (largest within tolerance, and the interpolated crossing), the
noise scale logged at the checkpoint, and the samples trained (the run to the checkpoint plus the
branches) against the sweep's: 8 batches x 20 epochs x 32,000. Writes summary.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

QUIET = ["trainer.progress=false", "trainer.tensorboard=false", "checkpoint.every_minutes=0"]
SWEEP_SAMPLES = 8 * 20 * 32_000  # python -m launcher -m global_batch=32,...,4096, 20 epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="required but with --smoke (a temporary folder)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--at", type=int, default=96_000, help="samples to the checkpoint")
    parser.add_argument("--k", default="1,2,4,8,16")
    parser.add_argument("--samples", default="131072")
    parser.add_argument("--tolerance", default="0.05")
    parser.add_argument("--cooldown", default="0.5")
    parser.add_argument("--reference", type=float, default=407.0, help="the sweep's B_crit")
    parser.add_argument("--smoke", action="store_true", help="1 seed, 100 steps, k 1,2, 1,024")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.out is None and not args.smoke:
        parser.error("--out is required")
    if args.smoke:
        args.seeds, args.batch, args.at, args.k, args.samples = 1, 32, 3200, "1,2", "1024"
    with tempfile.TemporaryDirectory(prefix="bench-cbs-") as tmp:
        args.out = args.out or Path(tmp)
        run(args)


def run(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in range(args.seeds):
        run = args.out / f"seed{seed}"
        base = [sys.executable, "-m", "launcher", f"seed={seed}", f"global_batch={args.batch}"]
        base += [f"run_dir={run}", f"trainer.stop_after_samples={args.at}", *QUIET]
        base += [*args.overrides]
        subprocess.run(base, check=True, capture_output=True, text=True)
        probe = [sys.executable, "-m", "launcher.cbs", str(run), "--k", args.k]
        probe += ["--samples", args.samples, "--tolerance", args.tolerance]
        probe += ["--cooldown", args.cooldown, "--out", str(run / "cbs")]
        done = subprocess.run(probe, check=True, capture_output=True, text=True)
        print(done.stdout.strip().splitlines()[-1 - 0], flush=True)
        results.append(json.loads((run / "cbs" / "cbs.json").read_text()))
    print(
        f"probe: --k {args.k} --samples {args.samples} --tolerance {args.tolerance} "
        f"--cooldown {args.cooldown}, from batch {args.batch} at {args.at:,} samples"
    )
    print(
        "| seed | gaps (k: %) | largest within | crossing | / B_crit | B_simple there | samples |"
    )
    print("|---|---|---|---|---|---|---|")
    for seed, r in enumerate(results):
        gaps = " ".join(f"{b['k']}: {100 * b['gap']:+.1f}" for b in r["branches"])
        crossed = r["interpolated"]
        ratio = f"{crossed / args.reference:.2f}" if crossed else "-"
        cost = r["consumed_samples"] + r["samples_trained"]
        noise = r["noise_scale_at_checkpoint"]
        print(
            f"| {seed} | {gaps} | {r['critical_batch']} | "
            f"{f'{crossed:,.0f}' if crossed else '>= largest'} | {ratio} | "
            f"{f'{noise:,.0f}' if noise else '-'} | {cost:,} |"
        )
    crossings = [r["interpolated"] for r in results if r["interpolated"]]
    cost = (results[0]["consumed_samples"] + results[0]["samples_trained"]) / SWEEP_SAMPLES
    if crossings:
        median = statistics.median(crossings)
        print(
            f"median crossing {median:,.0f} = {median / args.reference:.2f} x B_crit "
            f"{args.reference:g}; samples per probe vs the sweep's {SWEEP_SAMPLES:,}: {cost:.1%}"
        )
    (args.out / "summary.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
