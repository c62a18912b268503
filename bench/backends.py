"""Backends side by side: DDP (Accelerate), DeepSpeed ZeRO-2/3 and FSDP2 through the launcher.

Every configuration trains the same GPT (`+recipe=gpt_small` at a size set here) on the same
generated corpus (`data.path`, so nothing depends on the standard library's size) with the same
plan (global batch, micro-batch, accumulation 2, steps, seed), each run a fresh `torchrun
--standalone --nproc_per_node N` job. Evaluation runs once, at the end; no checkpoints by time,
no memory probe (micro_batch is given), no progress bar, no TensorBoard, no noise-scale meter:
only the backend differs. The configurations alternate within each repeat (ABCDEF, ABCDEF, ...).

Each rank runs through this file's `--worker` mode: it calls `launcher.cli.main` with the
arguments `python -m launcher` would get (launcher/__main__.py: `console()` -> `main()`),
changing nothing else, and records
  - ru_maxrss at exit (`resource.getrusage(RUSAGE_SELF)`: the rank's peak resident set over the
    whole run, the final evaluation, the final gather and model_final.pt included);
  - VmHWM (/proc/self/status, the same high-water mark) read as soon as the run's eval line
    appears in metrics.jsonl (polled every 10 ms): the peak over training and the final
    evaluation, before the final checkpoint and model_final.pt;
  - on CUDA, the launcher's own `cuda_peak_bytes` from the final metrics line (rank 0).
DataLoader worker processes (none for text data) would not count in either.

Two references per rank. The import baseline (`--baseline`, run for each library): the same
torchrun start, each rank imports torch, the launcher's entry (launcher.cli, launcher.hydra_app)
and the library a backend trains with (accelerate / deepspeed / torch.distributed.fsdp), joins a
gloo (nccl on CUDA) group and exits; a run imports more (torch._dynamo and torch._inductor among
them: each run's record lists what it imported), so this understates a run's fixed cost. The tiny
run (`--tiny`): each configuration once with a 1-layer, 16-wide GPT for 2 steps, the run's own
overhead; "minus tiny run" is what the model, its gradients and optimizer state, the activations
and the backend's buffers add.

Speed: samples/s from metrics.jsonl between two logged steps (the launcher's train_s excludes
evaluation): (samples_b - samples_a) / (train_s_b - train_s_a) with a = the first logged step at
or after --skip-steps and b = the last, so start-up and the first steps' warm-up are outside it;
reported as a ratio to the DDP run of the same repeat.

    python bench/backends.py --repeats 3 --tiny [--out FILE.json]      # 2 CPU ranks (gloo)
    python bench/backends.py --device cuda --repeats 1 --budget-s 70 --no-baseline  # gpu_check.sh
    python bench/backends.py --device cuda --repeats 1 --plan-only --no-baseline    # a dry run
    python bench/backends.py --smoke   # seconds: DDP on 2 ranks, a 1 x 16 GPT for 2 steps, and
                                       # the Accelerate import baseline; fails if a run fails
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONFIGS: dict[str, list[str]] = {  # name -> launcher overrides; the first is the ratios' base
    "ddp": ["backend=accelerate"],
    "zero2": ["backend=deepspeed", "backend.zero_stage=2"],  # oom_recovery off by auto
    "zero3": ["backend=deepspeed", "backend.zero_stage=3"],
    "fsdp": ["backend=fsdp"],  # OOM-safe default: deferred reduction
    "fsdp-plain": ["backend=fsdp", "trainer.oom_recovery=false"],
    "fsdp-plain-noreshard": [
        "backend=fsdp",
        "trainer.oom_recovery=false",
        "backend.reshard_after_forward=false",
    ],
}
BASELINE_MODULES = {  # backend -> the library it imports when it trains
    "accelerate": "accelerate",
    "deepspeed": "deepspeed",
    "fsdp": "torch.distributed.fsdp",
}
HEAVY = ("accelerate", "deepspeed", "torch.distributed.fsdp", "torch._dynamo", "torch._inductor")
SIZES = {  # device -> model and plan; global batch = micro_batch x ranks x accumulation
    "cpu": dict(layers=4, width=256, heads=4, seq_len=64, micro_batch=8, accumulation=2, steps=20),
    "cuda": dict(
        layers=12, width=768, heads=12, seq_len=512, micro_batch=32, accumulation=2, steps=40
    ),
}


# ---------------------------------------------------------------------------- inside each rank
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def worker(result: Path, metrics: Path, args: list[str]) -> int:
    """One rank of one run: the launcher's own entry, plus the two peaks above."""
    at_eval: dict[str, int] = {}
    done = threading.Event()

    def watch() -> None:  # the high-water mark when the final eval line is written
        seen = -1
        while not done.wait(0.01):
            try:
                size = metrics.stat().st_size
                if size == seen:
                    continue
                seen, text = size, metrics.read_text()
            except OSError:
                continue
            if '"eval_loss"' in text:
                at_eval["hwm_kib"] = _status_kib("VmHWM")
                return

    threading.Thread(target=watch, daemon=True).start()
    from launcher.cli import main

    code = main(args)
    done.set()
    record = {
        "rank": int(os.environ.get("RANK", "0")),
        "code": code,
        "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "hwm_at_eval_kib": at_eval.get("hwm_kib"),
        "imported": [m for m in HEAVY if m in sys.modules],
    }
    result.write_text(json.dumps(record))
    return code


def baseline(result: Path, library: str, device: str) -> int:
    """One rank of the overhead baseline: imports and a process group, no model."""
    import importlib

    import torch
    import torch.distributed as dist

    import launcher.backends
    import launcher.cli
    import launcher.hydra_app  # noqa: F401  (what every run imports before its job)

    importlib.import_module(BASELINE_MODULES[library])
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.barrier()
    dist.destroy_process_group()
    record = {
        "rank": int(os.environ.get("RANK", "0")),
        "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "imported": [m for m in HEAVY if m in sys.modules],
    }
    result.write_text(json.dumps(record))
    return 0


# ---------------------------------------------------------------------------- the driver
def corpus(path: Path, n_bytes: int) -> None:
    """Word-like text (a fixed 2,000-word vocabulary, seed 0): a GPT has something to learn."""
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(2000)]
    out, size = [], 0
    while size < n_bytes:
        word = rng.choice(words)
        out.append(word)
        size += len(word) + 1
    path.write_text(" ".join(out))


def torchrun(nproc: int, mode: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(Path(__file__).resolve()),
        *mode,
    ]


def launcher_args(size: dict, data: Path, run_dir: Path, overrides: list[str], log_every: int):
    samples = size["global_batch"] * size["steps"]
    return [
        "+recipe=gpt_small",
        f"model.layers={size['layers']}",
        f"model.width={size['width']}",
        f"model.heads={size['heads']}",
        f"data.seq_len={size['seq_len']}",
        f"data.path={data}",
        f"global_batch={size['global_batch']}",
        f"micro_batch={size['micro_batch']}",
        f"trainer.samples={samples}",
        "trainer.eval_every_epochs=1000",  # once, at the end
        f"trainer.log_every={log_every}",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        "trainer.noise_scale=false",
        "memory.probe=false",
        "checkpoint.every_minutes=0",
        "checkpoint.keep=1",
        f"run_dir={run_dir}",
        *overrides,
    ]


def rate(metrics: Path, skip_steps: int) -> dict:
    """samples/s between the first logged step >= skip_steps and the last; CUDA peak if any."""
    lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    train = [x for x in lines if "samples_per_s" in x]
    late = [x for x in train if x["step"] >= skip_steps] or train
    a, b = late[0], late[-1]
    if b["train_s"] > a["train_s"]:
        per_s = (b["samples"] - a["samples"]) / (b["train_s"] - a["train_s"])
        window = f"steps {a['step']}-{b['step']}"
    else:  # one logged step only: the launcher's own rate since the start
        per_s, window = b["samples_per_s"], f"steps 0-{b['step']}"
    final = next((x for x in lines if x.get("final")), {})
    return {
        "samples_per_s": per_s,
        "window": window,
        "cuda_peak_bytes": final.get("cuda_peak_bytes"),
    }


def run_ranks(cmd: list[str], nproc: int, tmp: Path, tag: str, timeout: float) -> dict:
    results = tmp / f"{tag}.ranks"
    results.mkdir()
    path = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)
    env = dict(os.environ, BENCH_RESULTS=str(results), PYTHONPATH=path)
    log = tmp / f"{tag}.log"
    t0 = time.perf_counter()
    try:
        with log.open("w") as fh:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout
            )
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    wall = time.perf_counter() - t0
    ranks = {}
    for r in range(nproc):
        f = results / f"rank{r}.json"
        if f.exists():
            ranks[r] = json.loads(f.read_text())
    out = {"code": code, "wall_s": wall, "ranks": ranks, "log": str(log)}
    if code != 0:
        out["tail"] = log.read_text()[-3000:]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--nproc", type=int, default=0, help="ranks; 0 = 2 on CPU, every GPU on CUDA")
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--steps", type=int, default=0, help="optimizer steps; 0 = the device's")
    p.add_argument("--log-every", type=int, default=4)
    p.add_argument("--skip-steps", type=int, default=8, help="steps left out of samples/s")
    p.add_argument("--budget-s", type=float, default=0, help="start no run after this; 0 = none")
    p.add_argument("--run-timeout-s", type=float, default=300)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--tiny", action="store_true", help="also each config with a 1 x 16 GPT")
    p.add_argument(
        "--plan-only", action="store_true", help="each config with plan_only=true (a dry run)"
    )
    p.add_argument("--out", type=Path, default=None, help="JSON of every run")
    p.add_argument("--keep", type=Path, default=None, help="keep the run folders here")
    p.add_argument("--smoke", action="store_true", help="DDP, a 1 x 16 GPT, 2 steps")
    args = p.parse_args()

    size = dict(SIZES[args.device])
    libraries = ["accelerate", "deepspeed", "fsdp"]
    if args.smoke:
        size.update(layers=1, width=16, heads=1, seq_len=16, micro_batch=2, steps=2)
        args.configs, args.repeats, args.skip_steps, args.log_every = ["ddp"], 1, 0, 1
        args.tiny, args.no_baseline, libraries = False, False, ["accelerate"]
    if args.steps:
        size["steps"] = args.steps
    nproc = args.nproc
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available() and not args.plan_only:
            sys.exit("bench/backends.py: --device cuda, but torch sees no CUDA device")
        nproc = nproc or max(1, torch.cuda.device_count())
    nproc = nproc or 2
    accumulation = size["accumulation"]
    size["global_batch"] = size["micro_batch"] * nproc * accumulation
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-backends-"))
    data = tmp / "corpus.txt"
    samples = size["global_batch"] * size["steps"]
    corpus(data, int(samples * (size["seq_len"] + 1) / 0.95 * 1.2) + 10_000)  # < one epoch
    print(
        f"{args.device}: {nproc} rank(s), GPT {size['layers']} x {size['width']} "
        f"({size['heads']} heads), seq_len {size['seq_len']}, global batch "
        f"{size['global_batch']} = {size['micro_batch']} micro x {nproc} ranks x {accumulation}, "
        f"{size['steps']} steps; samples/s over steps >= {args.skip_steps}",
        flush=True,
    )
    report: dict = {
        "size": size,
        "nproc": nproc,
        "device": args.device,
        "baseline": {},
        "tiny": {},
        "runs": [],
    }
    if not args.no_baseline and not args.plan_only:
        for lib in libraries:
            cmd = torchrun(nproc, ["--baseline", lib, args.device])
            r = run_ranks(cmd, nproc, tmp, f"baseline-{lib}", args.run_timeout_s)
            report["baseline"][lib] = r
            rss = [r["ranks"].get(i, {}).get("maxrss_kib", 0) / 1024 for i in range(nproc)]
            print(
                f"baseline {lib}: code {r['code']}, RSS MiB " + " / ".join(f"{x:.0f}" for x in rss),
                flush=True,
            )
    if (
        args.tiny and not args.plan_only
    ):  # the same run with a 1-layer 16-wide GPT: the run's own overhead
        tiny = dict(size, layers=1, width=16, heads=1, steps=2)
        for name in args.configs:
            run_dir = tmp / f"tiny-{name}"
            cmd = torchrun(
                nproc,
                ["--worker", str(run_dir / "metrics.jsonl"), "--"]
                + launcher_args(tiny, data, run_dir, CONFIGS[name], args.log_every),
            )
            r = run_ranks(cmd, nproc, tmp, f"tiny-{name}", args.run_timeout_s)
            report["tiny"][name] = r
            print(
                f"tiny {name:22s} code {r['code']} wall {r['wall_s']:.1f}s  RSS MiB at eval "
                + " / ".join(
                    f"{(r['ranks'].get(i, {}).get('hwm_at_eval_kib') or 0) / 1024:.0f}"
                    for i in range(nproc)
                ),
                flush=True,
            )
            if r["code"] != 0:
                print(r["tail"], flush=True)
            shutil.rmtree(run_dir, ignore_errors=True)
    skipped, plan_only = [], ["plan_only=true"] if args.plan_only else []
    for rep in range(args.repeats):
        for name in args.configs:
            if args.budget_s and time.perf_counter() - start > args.budget_s:
                skipped.append(f"{name}#{rep}")
                continue
            run_dir = tmp / f"{name}-{rep}"
            cmd = torchrun(
                nproc,
                ["--worker", str(run_dir / "metrics.jsonl"), "--"]
                + launcher_args(size, data, run_dir, CONFIGS[name] + plan_only, args.log_every),
            )
            r = run_ranks(cmd, nproc, tmp, f"{name}-{rep}", args.run_timeout_s)
            r.update(config=name, repeat=rep)
            if r["code"] == 0 and not plan_only:
                r.update(rate(run_dir / "metrics.jsonl", args.skip_steps))
            report["runs"].append(r)
            rss = [r["ranks"].get(i, {}) for i in range(nproc)]
            line = (
                f"[{rep}] {name:22s} code {r['code']} wall {r['wall_s']:.1f}s  "
                f"samples/s {r.get('samples_per_s', float('nan')):.1f} ({r.get('window', '-')})  "
                "RSS MiB at eval "
                + " / ".join(f"{(x.get('hwm_at_eval_kib') or 0) / 1024:.0f}" for x in rss)
                + ", at exit "
                + " / ".join(f"{x.get('maxrss_kib', 0) / 1024:.0f}" for x in rss)
            )
            if r.get("cuda_peak_bytes"):
                line += f"  cuda peak {r['cuda_peak_bytes'] / 2**30:.2f} GiB"
            print(line, flush=True)
            if r["code"] != 0:
                print(r["tail"], flush=True)
            if args.keep:
                shutil.copytree(run_dir, args.keep / run_dir.name, dirs_exist_ok=True)
            shutil.rmtree(run_dir, ignore_errors=True)
    report["skipped"] = skipped
    report["summary"] = {} if plan_only else summarize(report, args.configs)
    report["total_s"] = time.perf_counter() - start
    print(f"total {report['total_s']:.0f}s" + (f"; skipped {skipped}" if skipped else ""))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    runs = [*report["baseline"].values(), *report["tiny"].values(), *report["runs"]]
    if args.smoke and any(r["code"] != 0 for r in runs):
        sys.exit("bench/backends.py --smoke: a run failed (its output above)")


def summarize(report: dict, configs: list[str]) -> dict:
    """Medians [min-max] per configuration; speed as a ratio to the first configuration (DDP) of
    the same repeat; peak RSS per rank, and its median less the import baseline and the tiny run."""
    nproc, runs = report["nproc"], [r for r in report["runs"] if r["code"] == 0]
    base_of = {r["repeat"]: r["samples_per_s"] for r in runs if r["config"] == configs[0]}
    lib_of = {"ddp": "accelerate", "zero2": "deepspeed", "zero3": "deepspeed"}

    def med(xs: list[float], fmt: str) -> str:
        if not xs:
            return "-"
        return f"{statistics.median(xs):{fmt}} [{min(xs):{fmt}}-{max(xs):{fmt}}]"

    def kib(rank_record: dict | None, key: str) -> float | None:
        value = (rank_record or {}).get(key)
        return value / 1024 if value else None

    summary = {}
    for name in configs:
        mine = [r for r in runs if r["config"] == name]
        speed = [r["samples_per_s"] for r in mine]
        ratio = [r["samples_per_s"] / base_of[r["repeat"]] for r in mine if r["repeat"] in base_of]
        row = {"n": len(mine), "samples_per_s": speed, "ratio": ratio, "ranks": {}}
        line = f"{name:22s} n={len(mine)}  samples/s {med(speed, '.1f')}  / {configs[0]} "
        line += med(ratio, ".3f")
        base = report["baseline"].get(lib_of.get(name, "fsdp"), {}).get("ranks", {})
        tiny = report["tiny"].get(name, {}).get("ranks", {})
        for rank in range(nproc):
            at_eval = [kib(r["ranks"].get(rank), "hwm_at_eval_kib") for r in mine]
            at_eval = [x for x in at_eval if x]
            at_exit = [x for x in (kib(r["ranks"].get(rank), "maxrss_kib") for r in mine) if x]
            b, t = kib(base.get(rank), "maxrss_kib"), kib(tiny.get(rank), "hwm_at_eval_kib")
            m = statistics.median(at_eval) if at_eval else None
            row["ranks"][rank] = {
                "at_eval_mib": at_eval,
                "at_exit_mib": at_exit,
                "baseline_mib": b,
                "tiny_at_eval_mib": t,
                "minus_baseline_mib": m - b if m and b else None,
                "minus_tiny_mib": m - t if m and t else None,
            }
            line += f"\n    rank {rank}: RSS MiB at eval {med(at_eval, '.0f')}, at exit "
            line += med(at_exit, ".0f")
            line += f"; - baseline {m - b:.0f}" if m and b else ""
            line += f"; - tiny run {m - t:.0f}" if m and t else ""
        if report["device"] == "cuda":
            peaks = [r["cuda_peak_bytes"] / 2**30 for r in mine if r.get("cuda_peak_bytes")]
            row["cuda_peak_gib"] = peaks
            line += f"\n    cuda_peak_bytes (rank 0) GiB {med(peaks, '.2f')}"
        summary[name] = row
        print(line, flush=True)
    return summary


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("--worker", "--baseline"):
        results = Path(os.environ["BENCH_RESULTS"])
        result = results / f"rank{os.environ.get('RANK', '0')}.json"
        if sys.argv[1] == "--worker":
            rest = sys.argv[3:]
            sys.exit(worker(result, Path(sys.argv[2]), rest[1:] if rest[:1] == ["--"] else rest))
        sys.exit(baseline(result, sys.argv[2], sys.argv[3]))
    main()
