"""Training throughput: the launcher's loop vs a plain PyTorch loop on ResNet-50 or a GPT, with MFU.

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
run then holds the compilation (train and eval graphs), and the timed runs reuse it. `--sides`
runs a subset (e.g. plain,launcher: the noise meter's half-batch graph is one more compilation).

`--model gpt` (issue 23): the launcher's own GPT (launcher/models/gpt.py, `+recipe=gpt_small`:
AdamW, betas (0.9, 0.99), weight decay 0.1 on the >= 2-D weights, gradient clipping 1.0, cosine
LR; bf16 autocast by backend.mixed_precision=auto on a bf16 GPU, float32 on CPU) at --layers x
--width, --heads, --seq (default 12 x 768, 12 heads, 1024: GPT-2 small's body, byte vocabulary),
micro-batch --batch (default 16), on a pool of 4 resident batches of random byte tokens, through the
same `fit` as above vs a nanoGPT-style loop (Karpathy's train.py: autocast forward, cross-entropy
on the flattened logits, backward, clip_grad_norm_, step, zero_grad(None), the LR set every step)
on the same model class and batches. The optimizer settings are the same on both sides; its
implementation is not: the plain loop uses AdamW(fused=True) on CUDA, as nanoGPT does
(--plain-foreach: torch's default foreach, the launcher's), the launcher its own AdamW (torch's
default: foreach on CUDA). The launcher counts each step's target tokens before the step
(training/loop.py `_step_batches`): with these device-resident targets that count reads the device
(one sync per step), which host batches from a loader would not. `--host-batches` keeps the token
pool in pinned host memory instead, as a loader's batches arrive: the launcher copies each batch
with its own `to_device` (non_blocking) and counts the tokens on the host, the plain loop copies
them as nanoGPT's get_batch does (`.to(device, non_blocking=True)`). Tokens/s = trained tokens / the
median run; MFU = tokens/s x FLOP per token / the dense bf16 peak, with nanoGPT's estimate_mfu
count: 6 N + 12 L H Q T per token, N = the parameters less the position embedding (nanoGPT's
non-embedding count: the token embedding is the tied output layer and counts), L layers, H x Q =
the width, T = the sequence length (attention FLOP as if unmasked, as nanoGPT counts them).

`--profile PATH`: after the timed runs, one more run of the launcher (no meter) and of the plain
loop, each under torch.profiler (CPU activity, and CUDA where available); PATH gets their
`key_averages().table(sort_by=..., row_limit=25)`, by self CPU time and on CUDA also by self CUDA
time, each headed by its run's seconds under the profiler.

    python bench/throughput.py [--device cuda] [--batch 256] [--steps 50] [--repeats 3]
        [--backend accelerate|deepspeed] [--zero-stage 2] [--cudnn-benchmark] [--compile]
        [--sides plain,launcher,launcher+noise] [--profile prof.txt] [--out result.json]
    python bench/throughput.py --model gpt [--layers 12 --width 768 --heads 12 --seq 1024]
        [--batch 16] [--plain-foreach] [--host-batches] [--compile] ...
    python bench/throughput.py --device cpu --arch resnet18 --image 64 --batch 16 --steps 4  # smoke
    python bench/throughput.py --device cpu --model gpt --layers 2 --width 64 --heads 2 --seq 64 \
        --batch 8 --steps 6 --repeats 2  # smoke
    python bench/throughput.py --smoke   # seconds: a ResNet-18 and a 1-layer GPT, 2 steps, 1
                                         # repeat each, --profile into a temporary folder
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
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
from launcher.models.loss import CrossEntropy
from launcher.optim import build_optimizer
from launcher.planning.plan import PlanInput, plan_batch
from launcher.planning.schedule import lr_at
from launcher.training.job import on_device
from launcher.training.loop import fit
from launcher.training.metrics import MetricsSink
from launcher.types.bundles import Feed, Settings, Trainee

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
    through the backend (the set-up is not timed). DeepSpeed's backend holds the state of the
    engine it prepared last (its parameter groups; ZeRO's gradient buckets), so with it every run
    builds and prepares its own model, untimed, as before --compile (a compiled model's code is
    then reused: no recompilation for a new instance of the same module)."""
    fresh = cfg.backend.name == "deepspeed"

    def build():
        model = _model(cfg, spec, compile_)
        optimizer = build_optimizer(plan.optimizer, cfg.optim, model, plan.lr, plan.weight_decay)
        return backend.prepare(model, optimizer, plan)

    prepared = None if fresh else build()

    def run(name: str) -> float:
        model, optimizer = build() if fresh else prepared
        run_dir = Path(tmp, f"{name}-noise" if noise else name)
        run_dir.mkdir()
        sink = MetricsSink(run_dir, total_steps=plan.steps, tensorboard=True, progress=False)
        window = cfg.trainer.noise_window * plan.total_samples
        meter = NoiseMeter(backend, window, cfg.trainer.noise_split_every) if noise else None
        _sync(backend.device)
        start = time.perf_counter()
        fit(
            Trainee(model, optimizer, backend, torch.float32, CrossEntropy()),
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


def _plain_setup(cfg, plan, model: torch.nn.Module) -> tuple[list, list[float], torch.dtype, str]:
    """What both hand-written loops start from: two parameter groups (weight decay on the >= 2-D
    weights only), the LR of every step, the autocast dtype and the precision setting."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": plan.weight_decay}, {"params": rest}]
    lrs = [lr_at(plan, plan.samples_at(step)) for step in range(plan.steps)]
    precision = cfg.backend.mixed_precision
    return groups, lrs, torch.bfloat16 if precision == "bf16" else torch.float16, precision


def plain_side(cfg, spec, plan, pool, evals, device: torch.device, compile_: bool):
    """The hand-written loop on the same batches; returns run(name) -> seconds."""
    model = _model(cfg, spec, compile_).to(device)
    groups, lrs, half, precision = _plain_setup(cfg, plan, model)
    opt = torch.optim.SGD(
        groups, lr=plan.lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov
    )

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


def plain_gpt_side(cfg, spec, plan, pool, evals, device: torch.device, compile_: bool, fused):
    """A nanoGPT-style loop (Karpathy's train.py) on the same GPT and the same token batches:
    AdamW over two groups (weight decay on the >= 2-D weights only, as nanoGPT's
    configure_optimizers), the recipe's LR, betas and eps, `fused` (nanoGPT: on CUDA), autocast,
    the loss on the flattened logits, backward, clip_grad_norm_ (the recipe's 1.0, nanoGPT's
    grad_clip), step, zero_grad(None), the LR set every step; returns run(name) -> seconds."""
    model = _model(cfg, spec, compile_).to(device)
    groups, lrs, half, precision = _plain_setup(cfg, plan, model)
    opt = torch.optim.AdamW(
        groups,
        lr=plan.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        weight_decay=0.0,
        fused=fused,
    )
    clip = cfg.optim.clip_grad_norm

    def run(name: str) -> float:
        batches = itertools.cycle(pool)
        _sync(device)
        start = time.perf_counter()
        model.train()
        for step in range(plan.steps):
            for group in opt.param_groups:
                group["lr"] = lrs[step]
            x, y = (t.to(device, non_blocking=True) for t in next(batches))  # --host-batches
            with torch.autocast(device.type, dtype=half, enabled=precision != "no"):
                logits = model(x)
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=half, enabled=precision != "no"):
            for x, y in evals:  # loss and accuracy, read once, as the launcher's evaluation
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                logits = model(x)
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.view(-1))
                float(loss), int((logits.argmax(-1) == y).sum())
        _sync(device)
        return time.perf_counter() - start

    return run


def gpt_flop_per_token(model: torch.nn.Module, layers: int, width: int, seq: int) -> float:
    """nanoGPT's estimate_mfu: 6 N + 12 L H Q T per token, N = the parameters less the position
    embedding (nanoGPT's get_num_params(non_embedding=True); the token embedding is the tied
    output layer and counts), H x Q = width, T = the sequence length."""
    n = sum(p.numel() for p in model.parameters()) - model.positions.weight.numel()
    return 6 * n + 12 * layers * width * seq


def profile_runs(sides: dict, device: torch.device, path: Path) -> None:
    """One more run of the launcher and of the plain loop, each under torch.profiler (CPU, and
    CUDA where available); their key_averages tables (top 25 by self CPU time, and on CUDA by
    self CUDA time) written to `path`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    keys = ["self_cpu_time_total"] + (["self_cuda_time_total"] if device.type == "cuda" else [])
    parts = []
    for name in ("launcher", "plain"):
        with profile(activities=activities) as prof:
            seconds = sides[name](f"profile-{name}")
        averages = prof.key_averages()
        for key in keys:
            parts.append(f"== {name}: one run under the profiler, {seconds:.3f} s; sorted by {key}")
            parts.append(averages.table(sort_by=key, row_limit=25))
    path.write_text("\n".join(parts) + "\n")
    print(f"profile tables: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=["resnet", "gpt"], default="resnet")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--layers", type=int, default=12, help="gpt: blocks")
    parser.add_argument("--width", type=int, default=768, help="gpt: model width")
    parser.add_argument("--heads", type=int, default=12, help="gpt: attention heads")
    parser.add_argument("--seq", type=int, default=1024, help="gpt: sequence length")
    parser.add_argument("--batch", type=int, help="micro-batch (resnet: 256, gpt: 16)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", choices=["accelerate", "deepspeed"], default="accelerate")
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--cudnn-benchmark", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile on both sides")
    parser.add_argument(
        "--plain-foreach",
        action="store_true",
        help="gpt: the plain loop's AdamW foreach (the launcher's), not fused on CUDA",
    )
    parser.add_argument(
        "--host-batches",
        action="store_true",
        help="gpt: token batches in pinned host memory, copied per step (as a loader's)",
    )
    parser.add_argument(
        "--sides",
        default="plain,launcher,launcher+noise",
        help="which to run, comma-separated (plain and a launcher side at least)",
    )
    parser.add_argument("--profile", type=Path, help="profiler tables of one more run per side")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="both models at tiny sizes")
    args = parser.parse_args()
    if not args.smoke:
        run(parser, args)
        return
    torch.set_num_threads(1)  # 2 threads on a busy 2-core machine: 3x slower
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        for model, sizes in SMOKE.items():  # the sizes after the command line's flags: they win
            profile = ["--profile", str(Path(tmp, f"{model}.txt"))]
            run(parser, parser.parse_args([*sys.argv[1:], *sizes, *profile]))


SMOKE = {  # --smoke: each model at a tiny size, 2 steps, 1 repeat
    "resnet": ["--model", "resnet", "--arch", "resnet18", "--image", "32", "--batch", "4"],
    "gpt": ["--model", "gpt", "--layers", "1", "--width", "32", "--heads", "2", "--seq", "16"]
    + ["--batch", "2"],
}
for _sizes in SMOKE.values():
    _sizes += ["--steps", "2", "--repeats", "1"]


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    gpt = args.model == "gpt"
    if args.batch is None:
        args.batch = 16 if gpt else 256
    if gpt:
        overrides = [
            "+recipe=gpt_small",
            f"model.layers={args.layers}",
            f"model.width={args.width}",
            f"model.heads={args.heads}",
            f"data.seq_len={args.seq}",
        ]
    else:
        overrides = [
            "+recipe=resnet50",
            "data=synthetic",
            f"data.input_shape=[3,{args.image},{args.image}]",
            f"data.train_samples={args.batch * args.steps}",
            f"data.eval_samples={args.batch}",
            f"model.arch={args.arch}",
        ]
    overrides += [
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
    plan = plan_batch(PlanInput(cfg, 1, args.batch * args.steps))
    assert plan.steps == args.steps and plan.micro_batch == args.batch
    g = torch.Generator(device="cpu").manual_seed(0)
    if gpt:  # random byte tokens: inputs and next-token targets, batch x seq

        def place(t: torch.Tensor) -> torch.Tensor:  # resident, or pinned host memory
            if not args.host_batches:
                return t.to(device)
            return t.pin_memory() if device.type == "cuda" else t

        pool = [
            tuple(
                place(torch.randint(spec.num_classes, (args.batch, args.seq), generator=g))
                for _ in range(2)
            )
            for _ in range(4)
        ]
    else:
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
    fused = gpt and device.type == "cuda" and not args.plain_foreach
    chosen = args.sides.split(",")
    if "plain" not in chosen or not {"launcher", "launcher+noise"} & set(chosen):
        parser.error("--sides: plain and at least one of launcher, launcher+noise")
    if set(chosen) - {"plain", "launcher", "launcher+noise"}:
        parser.error(f"--sides {args.sides!r}: plain, launcher, launcher+noise")
    if args.profile and "launcher" not in chosen:
        parser.error("--profile profiles the launcher side: include it in --sides")
    runs: dict[str, list[float]] = {name: [] for name in chosen}
    with tempfile.TemporaryDirectory() as tmp:
        makers = {
            "plain": lambda: (
                plain_gpt_side(cfg, spec, plan, pool, evals, device, args.compile, fused)
                if gpt
                else plain_side(cfg, spec, plan, pool, evals, device, args.compile)
            ),
            "launcher": lambda: launcher_side(
                cfg, spec, plan, backend, pool, evals, False, tmp, args.compile
            ),
            "launcher+noise": lambda: launcher_side(
                cfg, spec, plan, backend, pool, evals, True, tmp, args.compile
            ),
        }
        sides = {name: makers[name]() for name in chosen}
        for name, side in sides.items():  # untimed: compilation, autotuning, allocator, first
            side(f"warm-{name}")  # calls (run-folder names: one per run)
        for r in range(args.repeats):
            for name, side in sides.items():
                runs[name].append(side(f"{name}-{r}"))
        if args.profile:
            profile_runs(sides, device, args.profile)
    peak, device_name = peak_flops(device)
    if gpt:
        flop = gpt_flop_per_token(_model(cfg, spec, False), args.layers, args.width, args.seq)
        unit, per_sample = "tokens", args.seq
        what = f"GPT {args.layers} x {args.width} ({args.heads} heads), seq {args.seq}, " + (
            "host batches" if args.host_batches else "resident batches"
        )
    else:
        flop = R50_TRAIN_FLOP * (args.image / 224) ** 2 if args.arch == "resnet50" else None
        unit, per_sample = "images", 1
        what = f"{args.arch} {args.image}px"
    trained = args.batch * args.steps * per_sample  # the time includes one eval batch per side
    result = {
        "device": device_name,
        "torch": torch.__version__,
        "backend": args.backend
        + (f" ZeRO {args.zero_stage}" if args.backend == "deepspeed" else ""),
        "model": args.model,
        "micro_batch": args.batch,
        "steps": args.steps,
        "precision": cfg.backend.mixed_precision,
        "compile": args.compile,
        "sides": chosen,
        "host_batches": gpt and args.host_batches,
        "runs_s": runs,
    }
    if gpt:
        result |= {
            "layers": args.layers,
            "width": args.width,
            "heads": args.heads,
            "seq": args.seq,
            "optimizer": {
                "plain": f"AdamW {'fused' if fused else 'foreach (torch default)'}",
                "launcher": "AdamW (torch default: foreach on CUDA)",
            },
            "flop_per_token": flop,
        }
    else:
        result |= {
            "arch": args.arch,
            "image": args.image,
            "channels_last": cfg.trainer.channels_last,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "flop_per_image": flop,
        }
    print(
        f"{device_name}, torch {torch.__version__}, {what}, micro-batch {args.batch}, "
        f"{args.steps} steps, {cfg.backend.mixed_precision}, backend {result['backend']}, "
        f"compile {'on' if args.compile else 'off'}, {args.repeats} alternating runs"
    )
    count = "nanoGPT's 6 N + 12 L H Q T" if gpt else "24.5 GFLOP x (image/224)^2"
    print(
        f"FLOP per {unit[:-1]}: {f'{flop:.4g}' if flop else 'not set for this arch'} ({count}); "
        f"dense bf16 peak: {f'{peak / 1e12:.1f} TFLOP/s' if peak else 'unknown (no MFU)'}"
    )
    if gpt:
        print(f"plain optimizer: {result['optimizer']['plain']}; launcher: AdamW torch default")
    rates = {}
    for name, seconds in runs.items():
        rates[name] = trained / statistics.median(seconds)
        mfu = f", MFU {rates[name] * flop / peak:.1%}" if flop and peak else ""
        print(
            f"{name:>15}: {rates[name]:,.0f} {unit}/s{mfu} "
            f"(runs s: {', '.join(f'{t:.2f}' for t in seconds)})"
        )
    for name in [n for n in runs if n != "plain"]:
        print(f"ratio {name} / plain = {rates[name] / rates['plain']:.3f} (medians)")
    result[f"{unit}_per_s"] = rates
    result["peak_flops"] = peak
    result["mfu"] = {k: v * flop / peak for k, v in rates.items()} if flop and peak else None
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
