"""What measuring the gradient noise scale costs: the launcher's loop with it on vs off.

The default run (MNIST-1D CNN, global batch 512, one CPU thread; a 5k-parameter model, so per-step
costs weigh the most here) in five configurations, alternating in one process, the same steps:
- 512x1 off: trainer.noise_scale=false;
- 512x1 on: the default; one micro-batch per step on one rank, so split mode: every 10th step runs
  its micro-batch as two halves, and the meter reads two squared norms on those steps;
- 512x1 on, split every step: trainer.noise_split_every=1 (the worst case);
- 256x2 off / 256x2 on: micro_batch=256, where micro mode measures every step for free but for
  the meter itself (two squared norms per step, one sum over ranks per log line).
Result: median samples/s of each "on" against its "off" (target: >= 0.97). Then, since single runs
vary by 10-20% on a shared VM, the meter's own work is timed in isolation on the model's real
gradients (a local norm, the global norm, a tenth of a flush) against one training step.

    python bench/noise_overhead.py [--epochs 5] [--repeats 7]
    python bench/noise_overhead.py --smoke   # seconds: 1 epoch, 1 repeat, 20 meter calls
"""

from __future__ import annotations

import argparse
import statistics

import torch
from overhead import launcher_loop  # bench/: run as `python bench/noise_overhead.py`

from launcher.backends.accelerate import AccelerateBackend
from launcher.config.compose import compose_run
from launcher.data import build_splits
from launcher.planning.plan import PlanInput, plan_batch
from launcher.training.job import on_device


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="1 epoch, 1 repeat, 20 meter calls")
    args = parser.parse_args()
    if args.smoke:
        args.epochs, args.repeats = 1, 1
    torch.set_num_threads(1)
    base = ["global_batch=512", f"trainer.epochs={args.epochs}"]
    configs = {
        "512x1 off": ["trainer.noise_scale=false"],
        "512x1 on": [],
        "512x1 on, split every step": ["trainer.noise_split_every=1"],
        "256x2 off": ["micro_batch=256", "trainer.noise_scale=false"],
        "256x2 on": ["micro_batch=256"],
    }
    configs = {k: on_device(compose_run([*base, *v]), "cpu") for k, v in configs.items()}
    plans = {k: plan_batch(PlanInput(cfg, 1, 32000)) for k, cfg in configs.items()}
    assert [p.noise for p in plans.values()] == ["off", "split", "split", "off", "micro"]
    splits = build_splits(configs["512x1 off"].data)
    backend = AccelerateBackend(configs["512x1 off"], "cpu")
    times: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(args.repeats):
        for name, cfg in configs.items():
            times[name].append(launcher_loop(cfg, splits, backend, None))  # meter: the plan's mode
    steps = plans["512x1 off"].steps
    print(f"{steps} steps at global batch 512 per run, {args.repeats} repeats, 1 thread")
    rate = {k: steps * 512 / statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        base = rate[k.split(" ")[0] + " off"]
        print(
            f"{k:>27}: median {statistics.median(v):.3f} s, {rate[k]:,.0f} samples/s, "
            f"ratio to off {rate[k] / base:.3f} (runs: {', '.join(f'{t:.3f}' for t in v)})"
        )
    work, step = meter_cost(configs["512x1 on"], splits, backend, 20 if args.smoke else 2000)
    print(
        f"meter work per measured step {work * 1e6:.0f} us, a training step at 512x1 "
        f"{step * 1e3:.2f} ms: {work / step:.2%} when every step is measured, "
        f"{work / step / 10:.2%} in split mode (every 10th)"
    )


def meter_cost(cfg, splits, backend, repeats: int = 2000) -> tuple[float, float]:
    """(seconds of the meter's work per measured step, seconds per training step at 512x1)."""
    import time

    import torch.nn.functional as F

    from launcher.batchsize.meter import NoiseMeter
    from launcher.models import build_model

    plan = plan_batch(PlanInput(cfg, 1, len(splits.train)))
    model = build_model(cfg.model, splits.spec)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = splits.train.x[:512], splits.train.y[:512]

    def step() -> None:
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    def measure() -> None:
        meter.start_step(0, plan)
        meter.backward_done(model, plan, 0, 0, 256)
        meter.reduced(model, plan)
        if len(meter._pending) == 10:
            meter.flush()

    def per_call(work, n: int) -> float:
        work()  # warm-up
        start = time.perf_counter()
        for _ in range(n):
            work()
        return (time.perf_counter() - start) / n

    step()
    meter = NoiseMeter(backend, 1e5, 1)
    return per_call(measure, repeats), per_call(step, repeats // 10)


if __name__ == "__main__":
    main()
