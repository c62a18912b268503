"""Loop overhead: the launcher's training loop vs a hand-written PyTorch loop, a plain Accelerate
loop and a Lightning loop, same model and data.

All train the MNIST-1D CNN at global batch 512 on one CPU thread for the same number of steps,
in this process, alternating runs; the ratio of median samples/s is the result (target: launcher
>= 0.98 x hand-written). The launcher side is the real path with what a default run has on: plan,
Accelerate backend, sampler, DataLoader, LR per step, out-of-memory-safe steps, the step-health
check, the noise meter in the plan's mode, metrics.jsonl + TensorBoard every `log_every` steps,
one evaluation at the end (every side). The progress bar is off (it only writes to the terminal).
Every side clips the gradient norm as the recipe does (optim.clip_grad_norm). The hand-written
loop takes one permutation per epoch and indexes the data with it; the Accelerate and Lightning
loops get the same batches the same way (a DataLoader over whole index arrays, no per-sample
collation), SGD with the same LR curve set each step, no logging, no progress bar, no
checkpoints: what their loops add is what is measured.

`--features` also runs the launcher with one feature off at a time and gives each feature's cost
per step: (median with it - median without it) / steps.

    python bench/overhead.py [--epochs 5] [--repeats 5] [--clock wall|cpu] [--peers] [--features]
    python bench/overhead.py --smoke   # seconds: 1 epoch, 1 repeat, --features, the installed peers
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from launcher.backends.accelerate import AccelerateBackend
from launcher.batchsize.meter import NoiseMeter
from launcher.config.compose import compose_run
from launcher.data import build_splits, eval_loader, train_loader
from launcher.data.sampler import epoch_permutation
from launcher.models import build_model
from launcher.models.loss import CrossEntropy
from launcher.optim import build_optimizer
from launcher.planning.plan import PlanInput, plan_batch
from launcher.training.guard import Health
from launcher.training.job import on_device
from launcher.training.loop import fit
from launcher.training.metrics import MetricsSink
from launcher.types.bundles import Feed, Settings, Trainee

CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCK["wall"]
# What a default run has on (training/phases.py), each of which --features turns off in turn.
FEATURES = ("noise meter", "health check", "oom-safe step", "tensorboard")


def launcher_loop(cfg, splits, backend, run_dir: Path | None, off: tuple[str, ...] = ()) -> float:
    """The launcher's real loop, `fit()`, with one final evaluation and what a default run has
    on (the noise meter in the plan's mode, the health check, out-of-memory-safe steps,
    TensorBoard) except the FEATURES in `off`; returns seconds."""
    plan = plan_batch(PlanInput(cfg, 1, len(splits.train)))
    torch.manual_seed(0)
    model = build_model(cfg.model, splits.spec)
    optimizer = build_optimizer(plan.optimizer, cfg.optim, model, plan.lr, plan.weight_decay)
    model, optimizer = backend.prepare(model, optimizer, plan)
    if run_dir is not None:
        run_dir.mkdir()
    tensorboard = "tensorboard" not in off
    sink = MetricsSink(run_dir, total_steps=plan.steps, tensorboard=tensorboard, progress=False)
    window = cfg.trainer.noise_window * plan.total_samples
    meter = plan.noise != "off" and "noise meter" not in off
    noise = NoiseMeter(backend, window, cfg.trainer.noise_split_every) if meter else None
    t = cfg.trainer
    health = Health(t.spike_factor, t.diverge_factor) if "health check" not in off else None
    start = _clock()
    fit(
        Trainee(model, optimizer, backend, torch.float32, CrossEntropy()),
        plan,
        Feed(
            lambda plan, step: train_loader(splits.train, plan, 0, 0, step),
            lambda plan: eval_loader(splits.eval, plan, 0),
        ),
        sink,
        Settings(
            log_every=t.log_every,
            eval_every_samples=plan.total_samples,
            oom_recovery=plan.oom_recovery and "oom-safe step" not in off,
            health=health,
            skip_spikes=t.skip_spikes,
            nonfinite_limit=t.nonfinite_limit,
        ),
        meter=noise,
    )
    elapsed = _clock() - start
    sink.close()
    return elapsed


def timed_calls(cfg, splits, backend, plan, run_dir: Path, calls: int) -> dict[str, float]:
    """Each feature's own per-step work timed alone (the median of `calls` timings, each after a
    fresh backward where the feature reads gradients, as in the loop), in ms per training step:
    what the whole-loop differences measure too, without the loop's run-to-run spread.
    - noise meter: a split step (two half micro-batches and the first half's norm) minus a plain
      one, over `trainer.noise_split_every` steps, plus its per-log-line flush over `log_every`;
    - health check: Health.bits with the gradients and the clip that reuses their norms, minus
      the clip alone (which computes them itself);
    - tensorboard: metrics lines with TensorBoard minus without (timed as a batch: its writer
      thread serializes after the call returns), over `log_every`;
    - oom-safe step: on one process it runs nothing the plain step does not (no_sync, the
      reduction and the flag gather are the same no-ops), so it is not timed here."""
    from launcher.backends.accelerate import clip
    from launcher.batchsize.meter import squared_norm

    torch.manual_seed(0)
    model = build_model(cfg.model, splits.spec)
    optimizer = build_optimizer(plan.optimizer, cfg.optim, model, plan.lr, plan.weight_decay)
    model, optimizer = backend.prepare(model, optimizer, plan)
    x, y = splits.train.x[:512], splits.train.y[:512]
    t = cfg.trainer

    def pieces(n: int) -> None:
        for i in range(0, 512, 512 // n):
            loss = F.cross_entropy(model(x[i : i + 512 // n]), y[i : i + 512 // n], reduction="sum")
            backend.backward(loss)
            if n == 2 and i == 0:
                squared_norm(model)

    def median_ms(work, before=None) -> float:
        spent = []
        for _ in range(calls):
            if before is not None:
                before()
            start = time.process_time()
            work()
            spent.append(time.process_time() - start)
            optimizer.zero_grad(set_to_none=True)
        return statistics.median(spent) * 1e3

    split = median_ms(lambda: pieces(2)) - median_ms(lambda: pieces(1))
    meter = NoiseMeter(backend, t.noise_window * plan.total_samples, t.noise_split_every)

    def flush() -> None:
        meter.start_step(0, plan)
        pieces(2)
        meter.backward_done(model, plan, 0, 0, 256.0)
        meter.reduced(model, plan)

    flush_ms = median_ms(meter.flush, before=flush)
    health = Health(t.spike_factor, t.diverge_factor)
    loss = torch.tensor(2.3)
    most = cfg.optim.clip_grad_norm
    params = list(model.parameters())

    def checked() -> None:
        health.bits(loss, model, True)
        if most:
            clip(params, most, health.norms)

    bits = median_ms(checked, before=lambda: pieces(1))
    if most:
        bits -= median_ms(lambda: clip(params, most, None), before=lambda: pieces(1))
    record = {"step": 1, "samples": 512, "epoch": 0.01, "global_batch": 512, "loss": 2.3}
    record |= {"lr": 0.1, "samples_per_s": 9e4, "train_s": 1.0, "data_wait": 0.01}
    record |= {"grad_sq": 0.1, "grad_trace": 10.0, "noise_scale": 100.0}
    lines = {}
    for tensorboard in (False, True):
        folder = run_dir / f"tensorboard-{tensorboard}"
        folder.mkdir(parents=True)
        sink = MetricsSink(folder, total_steps=10**6, tensorboard=tensorboard, progress=False)
        start = time.process_time()
        for _ in range(calls):
            sink.log(record)
        sink.close()  # its events written
        lines[tensorboard] = (time.process_time() - start) / calls * 1e3
    return {
        "noise meter": split / t.noise_split_every + flush_ms / t.log_every,
        "health check": bits,
        "tensorboard": (lines[True] - lines[False]) / t.log_every,
    }


def handwritten_loop(cfg, splits, steps: int, peak: float, warmup: int, total: int) -> float:
    """What one would write by hand: a permutation per epoch, index tensors, cosine with
    warmup, the recipe's gradient clipping, SGD; returns seconds."""
    x_all, y_all = splits.train.x, splits.train.y
    n = len(x_all)
    torch.manual_seed(0)
    model = build_model(cfg.model, splits.spec)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.base_lr, momentum=0.9)
    clip = cfg.optim.clip_grad_norm
    start = _clock()
    order, shuffled = torch.empty(0, dtype=torch.long), -1
    for step in range(steps):
        seen = step * 512
        epoch, offset = divmod(seen, n)
        if epoch != shuffled:
            order, shuffled = torch.from_numpy(epoch_permutation(n, 0, epoch)), epoch
        idx = order[offset : offset + 512]
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, seen, peak, warmup, total)
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    _evaluate(model, splits)
    return _clock() - start


def _batches(n: int, steps: int) -> list:
    """The hand-written loop's index arrays: step s takes stream positions [512 s, 512 (s + 1))."""
    out = []
    for step in range(steps):
        epoch, offset = divmod(step * 512, n)
        out.append(torch.from_numpy(epoch_permutation(n, 0, epoch)[offset : offset + 512]))
    return out


def _lr(cfg, seen: int, peak: float, warmup: int, total: int) -> float:
    if seen < warmup:
        return cfg.optim.base_lr + (peak - cfg.optim.base_lr) * seen / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (seen - warmup) / (total - warmup)))


def _evaluate(model, splits) -> None:
    with torch.no_grad():  # the same single evaluation at the end
        model.eval()
        correct = sum(
            int((model(splits.eval.x[i : i + 512]).argmax(1) == splits.eval.y[i : i + 512]).sum())
            for i in range(0, len(splits.eval), 512)
        )
    assert correct > 0


def accelerate_loop(cfg, splits, steps: int, peak: float, warmup: int, total: int) -> float:
    """A plain Accelerate loop (Accelerator.prepare, accelerator.backward); returns seconds."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    model = build_model(cfg.model, splits.spec)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.base_lr, momentum=0.9)
    accelerator = Accelerator(cpu=True)
    model, opt = accelerator.prepare(model, opt)
    loader = DataLoader(splits.train, sampler=_batches(len(splits.train), steps), batch_size=None)
    start = _clock()
    for step, (x, y) in enumerate(loader):
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step * 512, peak, warmup, total)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if cfg.optim.clip_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm)
        opt.step()
    _evaluate(model, splits)
    return _clock() - start


def lightning_loop(cfg, splits, steps: int, peak: float, warmup: int, total: int) -> float:
    """A Lightning loop (LightningModule + Trainer(max_steps), LR by a per-step LambdaLR, no
    logger, checkpoints, progress bar or model summary); returns seconds, Trainer.fit included."""
    import lightning as L
    from torch.utils.data import DataLoader

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = build_model(cfg.model, splits.spec)

        def training_step(self, batch, _):  # noqa: ANN001
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):  # noqa: ANN201
            opt = torch.optim.SGD(self.parameters(), lr=1.0, momentum=0.9)  # x the lambda below
            curve = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda step: _lr(cfg, step * 512, peak, warmup, total)
            )
            return [opt], [{"scheduler": curve, "interval": "step"}]

    module = Module()
    loader = DataLoader(splits.train, sampler=_batches(len(splits.train), steps), batch_size=None)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=cfg.optim.clip_grad_norm or None,
    )
    start = _clock()
    trainer.fit(module, loader)
    _evaluate(module.net, splits)
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
    parser.add_argument("--peers", action="store_true", help="also Accelerate and Lightning loops")
    parser.add_argument(
        "--features", action="store_true", help="also the launcher with each feature off"
    )
    parser.add_argument("--smoke", action="store_true", help="1 epoch, 1 repeat, all sides")
    args = parser.parse_args()
    if args.smoke:
        args.epochs, args.repeats, args.peers, args.features = 1, 1, True, True
    global _clock
    _clock = CLOCK[args.clock]
    torch.set_num_threads(1)
    cfg = compose_run(["global_batch=512", f"trainer.epochs={args.epochs}"])
    cfg = on_device(cfg, "cpu")
    splits = build_splits(cfg.data)
    plan = plan_batch(PlanInput(cfg, 1, len(splits.train)))
    backend = AccelerateBackend(cfg, "cpu")
    times: dict[str, list[float]] = {"hand-written": [], "launcher": []}
    peers = {"accelerate": accelerate_loop, "lightning": lightning_loop} if args.peers else {}
    if args.smoke and importlib.util.find_spec("lightning") is None:
        del peers["lightning"]
        print("smoke: the Lightning loop skipped (lightning not installed: the bench extra)")
    curve = (plan.steps, plan.lr, plan.warmup_samples, plan.total_samples)
    without = FEATURES if args.features else ()
    with tempfile.TemporaryDirectory() as tmp:
        launcher_loop(cfg, splits, backend, Path(tmp) / "first")  # torch's lazy imports: once
        for r in range(args.repeats):
            times["hand-written"].append(handwritten_loop(cfg, splits, *curve))
            times["launcher"].append(launcher_loop(cfg, splits, backend, Path(tmp) / str(r)))
            for name, loop in peers.items():
                times.setdefault(name, []).append(loop(cfg, splits, *curve))
            for feature in without:
                run_dir = Path(tmp) / f"{r}-{feature.replace(' ', '-')}"
                seconds = launcher_loop(cfg, splits, backend, run_dir, (feature,))
                times.setdefault(f"- {feature}", []).append(seconds)
        alone = timed_calls(cfg, splits, backend, plan, Path(tmp), 200) if without else {}
    samples = plan.steps * 512
    rate = {k: samples / statistics.median(v) for k, v in times.items()}
    print(
        f"steps per run {plan.steps}, global batch 512, repeats {args.repeats}, 1 thread, "
        f"{args.clock} clock, noise meter mode {plan.noise} (split every "
        f"{cfg.trainer.noise_split_every}), clip {cfg.optim.clip_grad_norm}"
    )
    for k, v in times.items():
        print(
            f"{k:>12}: median {statistics.median(v):.3f} s, {rate[k]:,.0f} samples/s "
            f"(runs: {', '.join(f'{t:.3f}' for t in v)})"
        )
    for name in ("launcher", *peers):
        ratio = rate[name] / rate["hand-written"]
        print(f"ratio {name} / hand-written = {ratio:.3f} (medians)")
    best = {k: min(v) for k, v in times.items()}
    print(f"ratio of the fastest runs = {best['hand-written'] / best['launcher']:.3f}")
    step_ms = statistics.median(times["launcher"]) / plan.steps * 1e3
    for feature in without:
        cost = statistics.median(times["launcher"]) - statistics.median(times[f"- {feature}"])
        ms = cost / plan.steps * 1e3
        line = f"{feature:>14}: {ms:+.3f} ms per step ({ms / step_ms:+.1%} of {step_ms:.2f} ms)"
        if feature in alone:
            line += f"; its calls timed alone: {alone[feature]:.3f} ms per step"
            line += f" ({alone[feature] / step_ms:.1%})"
        print(line)


if __name__ == "__main__":
    main()
