"""Loop overhead: the launcher's training loop vs a hand-written PyTorch loop, same model and data.

Both train the MNIST-1D CNN at global batch 512 on one CPU thread for the same number of steps,
in this process, alternating runs; the ratio of median samples/s is the result (target >= 0.98).
The launcher side is the real path: plan, Accelerate backend, sampler, DataLoader, LR per step,
metrics.jsonl + TensorBoard every `log_every` steps, one evaluation at the end (both sides).
The progress bar is off on the launcher side (it only writes to the terminal).

    python bench/overhead.py [--epochs 5] [--repeats 5] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from launcher.backends.accelerate import AccelerateBackend
from launcher.compose import compose_run
from launcher.data import build_splits, eval_loader, train_loader
from launcher.data.sampler import epoch_permutation
from launcher.metrics import MetricsSink
from launcher.models import build_model
from launcher.noise_meter import NoiseMeter
from launcher.optim import build_optimizer
from launcher.plan import plan_batch
from launcher.run import on_device
from launcher.train import fit

CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCK["wall"]


def launcher_loop(cfg, splits, backend, run_dir: Path | None, meter: bool = False) -> float:
    """The launcher's real loop, `fit()`, with one final evaluation (and with `meter` the
    noise-scale meter, as run.py builds it); returns seconds."""
    plan = plan_batch(cfg, 1, len(splits.train))
    torch.manual_seed(0)
    model = build_model(cfg.model, splits.spec)
    optimizer = build_optimizer(plan.optimizer, cfg.optim, model, plan.lr, plan.weight_decay)
    model, optimizer = backend.prepare(model, optimizer, plan)
    if run_dir is not None:
        run_dir.mkdir()
    sink = MetricsSink(run_dir, total_steps=plan.steps, tensorboard=True, progress=False)
    window = cfg.trainer.noise_window * plan.total_samples
    noise = NoiseMeter(backend, window, cfg.trainer.noise_split_every) if meter else None
    start = _clock()
    fit(
        model,
        optimizer,
        plan,
        backend,
        lambda plan, step: train_loader(splits.train, plan, 0, 0, step),
        lambda plan: eval_loader(splits.eval, plan, 0),
        sink,
        log_every=cfg.trainer.log_every,
        eval_every_samples=plan.total_samples,
        dtype=torch.float32,
        meter=noise,
    )
    elapsed = _clock() - start
    sink.close()
    return elapsed


def handwritten_loop(cfg, splits, steps: int, peak: float, warmup: int, total: int) -> float:
    """What one would write by hand: index tensors, cosine with warmup, SGD; returns seconds."""
    x_all, y_all = splits.train.x, splits.train.y
    n = len(x_all)
    torch.manual_seed(0)
    model = build_model(cfg.model, splits.spec)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.base_lr, momentum=0.9)
    start = _clock()
    for step in range(steps):
        seen = step * 512
        epoch, offset = divmod(seen, n)
        idx = torch.from_numpy(epoch_permutation(n, 0, epoch)[offset : offset + 512])
        if seen < warmup:
            lr = cfg.optim.base_lr + (peak - cfg.optim.base_lr) * seen / warmup
        else:
            lr = 0.5 * peak * (1 + math.cos(math.pi * (seen - warmup) / (total - warmup)))
        for group in opt.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():  # the same single evaluation at the end
        model.eval()
        correct = sum(
            int((model(splits.eval.x[i : i + 512]).argmax(1) == splits.eval.y[i : i + 512]).sum())
            for i in range(0, len(splits.eval), 512)
        )
    assert correct > 0
    return _clock() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCK),
        default="wall",
        help="cpu: this process's CPU time (all its threads), immune to other tenants of a VM",
    )
    args = parser.parse_args()
    global _clock
    _clock = CLOCK[args.clock]
    torch.set_num_threads(1)
    cfg = compose_run(
        ["global_batch=512", f"trainer.epochs={args.epochs}", "trainer.noise_scale=false"]
    )
    cfg = on_device(cfg, "cpu")
    splits = build_splits(cfg.data)
    plan = plan_batch(cfg, 1, len(splits.train))
    backend = AccelerateBackend(cfg, "cpu")
    times: dict[str, list[float]] = {"hand-written": [], "launcher": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            times["hand-written"].append(
                handwritten_loop(
                    cfg, splits, plan.steps, plan.lr, plan.warmup_samples, plan.total_samples
                )
            )
            times["launcher"].append(launcher_loop(cfg, splits, backend, Path(tmp) / str(r)))
    samples = plan.steps * 512
    rate = {k: samples / statistics.median(v) for k, v in times.items()}
    print(
        f"steps per run {plan.steps}, global batch 512, repeats {args.repeats}, 1 thread, "
        f"{args.clock} clock"
    )
    for k, v in times.items():
        print(
            f"{k:>12}: median {statistics.median(v):.3f} s, {rate[k]:,.0f} samples/s "
            f"(runs: {', '.join(f'{t:.3f}' for t in v)})"
        )
    ratio = rate["launcher"] / rate["hand-written"]
    print(f"ratio launcher / hand-written = {ratio:.3f} (medians)")
    best = {k: min(v) for k, v in times.items()}
    print(f"ratio of the fastest runs = {best['hand-written'] / best['launcher']:.3f}")


if __name__ == "__main__":
    main()
