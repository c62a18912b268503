"""Training throughput: the launcher's loop vs a plain PyTorch loop on ResNet-50, with MFU.

Both sides train the `resnet50` recipe's model (torchvision ResNet-50, zero-init residual gamma),
channels-last (trainer.channels_last=auto: on CUDA), in the precision backend.mixed_precision=auto
gives (bf16 autocast on a bf16 GPU), with SGD + Nesterov and the recipe's weight decay (none on
BatchNorm and biases), one micro-batch per step, on the same batches: a pool of synthetic batches
made once on the device, so neither side waits for data and the difference is what each loop adds.

- launcher: `launcher.training.loop.fit` through the configured backend (Accelerate DDP wrapper, or
  DeepSpeed with --backend deepspeed), the LR from the plan every step, the out-of-memory-safe
  step (a flag gather before the gradient reduction), metrics.jsonl + TensorBoard every 10 steps,
  and, as `launcher+noise`, the gradient-noise-scale meter that runs by default.
- plain: what one writes by hand: autocast forward, cross-entropy, backward, step, zero_grad(None),
  the LR set every step.

Each side runs once untimed (cuDNN autotuning, allocator warm-up), then the sides alternate
`--repeats` times; a run is `--steps` steps and an evaluation of one batch, timed between two CUDA
synchronisations (model building and backend.prepare are not timed). Images/s = trained images /
the median run; MFU = images/s x 24.5 GFLOP (ResNet-50 at
224: 3 x 8.2 GFLOP forward; scaled by (image/224)^2 and set only for resnet50) / the GPU's dense
bf16 peak. cudnn.benchmark is the launcher's trainer.cudnn_benchmark (off unless --cudnn-benchmark),
set process-wide, so both sides run with the same setting.

Each side builds its model (and the launcher side its optimizer and backend.prepare) once, before
its untimed run, and keeps it for its timed runs. `--compile` compiles it in place on both sides:
the launcher's trainer.compile=true path (`model.compile()` before backend.prepare, as
launcher/training/phases.py `prepare` does) and `model.compile()` in the plain loop; the untimed
run then holds the compilation (train and eval graphs), and the timed runs reuse it.

    python bench/throughput.py [--device cuda] [--batch 256] [--steps 50] [--repeats 3]
        [--backend accelerate|deepspeed] [--zero-stage 2] [--cudnn-benchmark] [--compile]
        [--out result.json]
    python bench/throughput.py --device cpu --arch resnet18 --image 64 --batch 16 --steps 4  # smoke
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from launcher.backends import build_backend
from launcher.batchsize.meter import NoiseMeter
from launcher.config.compose import compose_run
from launcher.data import data_spec
from launcher.models import build_model
from launcher.optim import build_optimizer
from launcher.planning.plan import plan_batch
from launcher.planning.schedule import lr_at
from launcher.training.job import on_device
from launcher.training.loop import Feed, Settings, Trainee, fit
from launcher.training.metrics import MetricsSink

R50_TRAIN_FLOP = 24.5e9  # per image at 224 x 224: forward 8.2 GFLOP (4.1 GMAC), backward 2x
PEAK_BF16 = {  # dense bf16 tensor-core peak, FLOP/s (NVIDIA data sheets)
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989.4e12,  # SXM5 (HBM3)
    "H200": 989.4e12,
    "A100": 312e12,
    "L40S": 362e12,
}


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16.items():  # the specific names first
        if key in name:
            return peak, name
    return None, name


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(cfg, spec, compile_: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(cfg.model, spec)
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_:  # in place, as the launcher's trainer.compile=true (training/phases.py prepare)
        model.compile()
    return model


def launcher_side(cfg, spec, plan, backend, pool, evals, noise: bool, tmp: str, compile_: bool):
    """The model, its optimizer and backend.prepare once; returns run(name) -> seconds: fit()
    through the backend (the set-up is not timed)."""
    model = _model(cfg, spec, compile_)
    optimizer = build_optimizer(plan.optimizer, cfg.optim, model, plan.lr, plan.weight_decay)
    model, optimizer = backend.prepare(model, optimizer, plan)

    def run(name: str) -> float:
        run_dir = Path(tmp, f"{name}-noise" if noise else name)
        run_dir.mkdir()
        sink = MetricsSink(run_dir, total_steps=plan.steps, tensorboard=True, progress=False)
        window = cfg.trainer.noise_window * plan.total_samples
        meter = NoiseMeter(backend, window, cfg.trainer.noise_split_every) if noise else None
        _sync(backend.device)
        start = time.perf_counter()
        fit(
            Trainee(model, optimizer, backend, torch.float32),
            plan,
            Feed(lambda plan, step: itertools.cycle(pool), lambda plan: evals),
            sink,
            Settings(log_every=cfg.trainer.log_every, eval_every_samples=plan.total_samples),
            meter=meter,
        )
        _sync(backend.device)
        elapsed = time.perf_counter() - start
        sink.close()
        return elapsed

    return run


def plain_side(cfg, spec, plan, pool, evals, device: torch.device, compile_: bool):
    """The hand-written loop on the same batches; returns run(name) -> seconds."""
    model = _model(cfg, spec, compile_).to(device)
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": plan.weight_decay}, {"params": rest}]
    opt = torch.optim.SGD(
        groups, lr=plan.lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov
    )
    lrs = [lr_at(plan, plan.samples_at(step)) for step in range(plan.steps)]
    precision = cfg.backend.mixed_precision
    half = torch.bfloat16 if precision == "bf16" else torch.float16

    def run(name: str) -> float:
        batches = itertools.cycle(pool)
        _sync(device)
        start = time.perf_counter()
        model.train()
        for step in range(plan.steps):
            for group in opt.param_groups:
                group["lr"] = lrs[step]
            x, y = next(batches)
            with torch.autocast(device.type, dtype=half, enabled=precision != "no"):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=half, enabled=precision != "no"):
            sum(int((model(x).argmax(1) == y).sum()) for x, y in evals)  # as the launcher counts
        _sync(device)
        return time.perf_counter() - start

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", choices=["accelerate", "deepspeed"], default="accelerate")
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--cudnn-benchmark", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile on both sides")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    overrides = [
        "+recipe=resnet50",
        "data=synthetic",
        f"data.input_shape=[3,{args.image},{args.image}]",
        f"data.train_samples={args.batch * args.steps}",
        f"data.eval_samples={args.batch}",
        f"model.arch={args.arch}",
        f"global_batch={args.batch}",
        f"micro_batch={args.batch}",
        "trainer.epochs=1",
        "trainer.log_every=10",
        f"backend={args.backend}",
        f"trainer.cudnn_benchmark={str(args.cudnn_benchmark).lower()}",
    ]
    if args.backend == "deepspeed":  # autocast keeps BatchNorm in float32, as Accelerate does
        overrides += [f"backend.zero_stage={args.zero_stage}", "backend.autocast=true"]
    device = torch.device(args.device)
    cfg = on_device(compose_run(overrides), device.type)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.trainer.cudnn_benchmark
    spec = data_spec(cfg.data)
    plan = plan_batch(cfg, 1, args.batch * args.steps)
    assert plan.steps == args.steps and plan.micro_batch == args.batch
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (args.batch, *spec.input_shape)
    pool = [
        (
            torch.randn(shape, generator=g).to(device),
            torch.randint(spec.num_classes, (args.batch,), generator=g).to(device),
        )
        for _ in range(4)
    ]
    evals = pool[:1]
    backend = build_backend(cfg, str(device))
    runs: dict[str, list[float]] = {"plain": [], "launcher": [], "launcher+noise": []}
    with tempfile.TemporaryDirectory() as tmp:
        sides = {
            "plain": plain_side(cfg, spec, plan, pool, evals, device, args.compile),
            "launcher": launcher_side(
                cfg, spec, plan, backend, pool, evals, False, tmp, args.compile
            ),
            "launcher+noise": launcher_side(
                cfg, spec, plan, backend, pool, evals, True, tmp, args.compile
            ),
        }
        for name, side in sides.items():  # untimed: compilation, autotuning, allocator, first
            side(f"warm-{name}")  # calls (run-folder names: one per run)
        for r in range(args.repeats):
            for name, side in sides.items():
                runs[name].append(side(f"{name}-{r}"))
    peak, device_name = peak_flops(device)
    flop = R50_TRAIN_FLOP * (args.image / 224) ** 2 if args.arch == "resnet50" else None
    images = args.batch * args.steps  # trained; the time includes one eval batch on every side
    result = {
        "device": device_name,
        "torch": torch.__version__,
        "backend": args.backend
        + (f" ZeRO {args.zero_stage}" if args.backend == "deepspeed" else ""),
        "arch": args.arch,
        "image": args.image,
        "micro_batch": args.batch,
        "steps": args.steps,
        "precision": cfg.backend.mixed_precision,
        "channels_last": cfg.trainer.channels_last,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "compile": args.compile,
        "runs_s": runs,
    }
    print(
        f"{device_name}, torch {torch.__version__}, {args.arch} {args.image}px, micro-batch "
        f"{args.batch}, {args.steps} steps, {cfg.backend.mixed_precision}, backend "
        f"{result['backend']}, compile {'on' if args.compile else 'off'}, {args.repeats} "
        "alternating runs"
    )
    rates = {}
    for name, seconds in runs.items():
        rates[name] = images / statistics.median(seconds)
        mfu = f", MFU {rates[name] * flop / peak:.1%}" if flop and peak else ""
        print(
            f"{name:>15}: {rates[name]:,.0f} images/s{mfu} "
            f"(runs s: {', '.join(f'{t:.2f}' for t in seconds)})"
        )
    for name in ("launcher", "launcher+noise"):
        print(f"ratio {name} / plain = {rates[name] / rates['plain']:.3f} (medians)")
    result["images_per_s"] = rates
    result["mfu"] = {k: v * flop / peak for k, v in rates.items()} if flop and peak else None
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
