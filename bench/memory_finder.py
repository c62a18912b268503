"""Choosing the micro-batch from memory: the launcher's probe vs Lightning's and Accelerate's.

On CPU the device is virtual: a memory budget on the tensor bytes a step holds live (counted by
launcher.memory.profile.StorageMeter).
For the finders, which learn only from out-of-memory errors, the
meter raises the CPU allocator's own error text once live bytes pass the budget, so their OOM
detection fires exactly where a real device of that size would fail. Every method trains the same
model (fresh per trial, as after an OOM restart) with the same optimizer and batch shape.

Ground truth: the largest micro-batch whose real step fits, found by bisection over real steps
(monotone in the micro-batch) and confirmed at n (fits) and n + 1 (does not).

    python bench/memory_finder.py [--budget-mib 256] [--image 32] [--arch resnet18]
    python bench/memory_finder.py --device cuda --budget-mib 8192 --image 224 --arch resnet50 \\
        --precision bf16 --start 256        (on a GPU: bench/gpu_check.sh)
    python bench/memory_finder.py --smoke   # seconds: a 200 MiB budget, Lightning 3 trials
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from launcher.config.compose import compose_run
from launcher.data import data_spec
from launcher.data.synthetic import SyntheticDataset
from launcher.memory.probe import _step, measured_cap
from launcher.memory.profile import StorageMeter, is_oom
from launcher.planning.plan import PlanInput, plan_batch
from launcher.training.job import on_device

MIB = 2**20


class BudgetedMeter(StorageMeter):
    """A device with `budget` bytes: past it, the CPU allocator's out-of-memory error."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = budget

    def _count(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()  # an allocation that fails is never counted as live
        if storage not in self._seen and self.live + storage.nbytes() > self.budget:
            raise RuntimeError(
                f"DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                f"{storage.nbytes()} bytes, {self.live} of {self.budget} in use (virtual device)"
            )
        super()._count(t)


def setup(args: argparse.Namespace, cache: str):
    cfg = compose_run(
        ["+recipe=resnet50", f"model.arch={args.arch}", "data=synthetic", "data.num_classes=10"]
        + [f"data.input_shape=[3,{args.image},{args.image}]", "global_batch=8192"]
        + [f"memory.budget_gb={args.budget_mib / 1024}", f"memory.margin_gb={args.margin_gib}"]
        + ["memory.fraction=1.0", f"memory.cache_dir={cache}", "max_micro_batch=8192"]
        + [f"backend.mixed_precision={args.precision}"]
    )
    cfg = on_device(cfg, "cuda" if args.device.startswith("cuda") else "cpu")
    return cfg, data_spec(cfg.data), plan_batch(PlanInput(cfg, 1, 1_281_167))


def trial(cfg, spec, plan, device: str, budget: int, n: int) -> None:
    """One training step of a fresh model at n samples on the (virtual or real) device."""
    with BudgetedMeter(budget) if device == "cpu" else nullcontext():
        _step(cfg, spec, plan, device, n)


def fits(cfg, spec, plan, device: str, budget: int, n: int) -> bool:
    try:
        trial(cfg, spec, plan, device, budget, n)
        return True
    except (RuntimeError, torch.OutOfMemoryError) as exc:
        if not is_oom(exc):
            raise
        return False
    finally:
        gc.collect()
        if device != "cpu":
            torch.cuda.empty_cache()


def ground_truth(cfg, spec, plan, device: str, budget: int) -> tuple[int, int]:
    """(largest micro-batch whose real step fits, real steps used): doubling, then bisection."""
    lo, hi, steps = 1, 2, 1
    while fits(cfg, spec, plan, device, budget, hi):
        lo, hi, steps = hi, hi * 2, steps + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        steps += 1
        if fits(cfg, spec, plan, device, budget, mid):
            lo = mid
        else:
            hi = mid
    return lo, steps


def launcher_probe(cfg, spec, plan, device: str) -> dict:
    start = time.perf_counter()
    cap, report = measured_cap(cfg, spec, plan, device, 1, lambda v: v)
    return {"found": cap, "steps": report["probe_steps"], "seconds": time.perf_counter() - start}


def accelerate_finder(cfg, spec, plan, device: str, budget: int, start_size: int) -> dict:
    from accelerate.utils import find_executable_batch_size

    trials = []

    @find_executable_batch_size(starting_batch_size=start_size)
    def train(batch_size: int) -> int:
        trials.append(batch_size)
        trial(cfg, spec, plan, device, budget, batch_size)
        return batch_size

    start = time.perf_counter()
    found = train()
    return {"found": found, "steps": len(trials), "seconds": time.perf_counter() - start}


def lightning_finder(cfg, spec, plan, device: str, budget: int, trials: int = 25) -> dict:
    import lightning as L
    from lightning.pytorch.tuner import Tuner

    from launcher.models import build_model
    from launcher.optim import build_optimizer

    steps = []

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.batch_size = 2
            self.net = build_model(cfg.model, spec)

        def training_step(self, batch, _):
            x, y = batch
            steps.append(len(y))
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return build_optimizer(plan.optimizer, cfg.optim, self.net, plan.lr, plan.weight_decay)

        def train_dataloader(self):  # samples made per index: only the batch is live
            data = SyntheticDataset(8 * self.batch_size, spec.input_shape, spec.num_classes, 0)
            return torch.utils.data.DataLoader(data, batch_size=self.batch_size)

    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator="cpu" if device == "cpu" else "gpu",
            precision="bf16-mixed" if cfg.backend.mixed_precision == "bf16" else "32-true",
            devices=1,
            max_epochs=1,
            logger=False,
            default_root_dir=tmp,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        start = time.perf_counter()
        with BudgetedMeter(budget) if device == "cpu" else nullcontext():
            module = Module()  # parameters live on the virtual device too
            found = Tuner(trainer).scale_batch_size(module, mode="binsearch", max_trials=trials)
        seconds = time.perf_counter() - start
    return {"found": found, "steps": len(steps), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--budget-mib", type=float, default=256)
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--precision", default="no", choices=["no", "bf16"])
    parser.add_argument("--start", type=int, default=512, help="Accelerate's starting size")
    parser.add_argument(
        "--margin-gib",
        type=float,
        default=0.0,
        help="the launcher's memory.margin_gb (0: the virtual CPU device has no fragmentation; "
        "on a GPU the launcher's default 0.5 covers the allocator's)",
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="200 MiB, --start 64, 3 trials")
    args = parser.parse_args()
    trials = 25  # Lightning's
    if args.smoke:  # ResNet-18 holds ~146 MiB at any size; Lightning failed at 165 MiB
        args.budget_mib, args.start, trials = 200, 64, 3
    budget = int(args.budget_mib * MIB)
    device = args.device
    if device == "cpu":
        torch.set_num_threads(1 if args.smoke else 2)  # smoke: 2 on a busy machine: 4x slower
        where = f"budget {args.budget_mib:g} MiB of counted tensor bytes (virtual device)"
    else:  # a real allocator limit: out of memory where the budget ends
        torch.cuda.set_per_process_memory_fraction(budget / torch.cuda.mem_get_info()[1])
        device = "cuda:0"
        where = f"{torch.cuda.get_device_name()} limited to {args.budget_mib:g} MiB per process"
    with tempfile.TemporaryDirectory() as cache:
        cfg, spec, plan = setup(args, cache)
        truth, truth_steps = ground_truth(cfg, spec, plan, device, budget)
        print(
            f"{args.arch}, 3x{args.image}x{args.image}, SGD, precision {args.precision}, {where}; "
            f"true largest micro-batch {truth} ({truth_steps} real steps to find)"
        )
        methods = {
            "launcher (probe: 2 traces + verify)": lambda: launcher_probe(cfg, spec, plan, device),
            "launcher, cached (a requeue or resume)": lambda: launcher_probe(
                cfg, spec, plan, device
            ),
            f"accelerate find_executable_batch_size({args.start})": lambda: accelerate_finder(
                cfg, spec, plan, device, budget, args.start
            ),
            "lightning Tuner.scale_batch_size(binsearch)": lambda: lightning_finder(
                cfg, spec, plan, device, budget, trials
            ),
        }
        if args.smoke and importlib.util.find_spec("lightning") is None:
            del methods["lightning Tuner.scale_batch_size(binsearch)"]
            print("smoke: Lightning's finder skipped (lightning not installed: the bench extra)")
        print("| method | micro-batch found | / true | training steps run | wall s | fits? |")
        print("|---|---|---|---|---|---|", flush=True)
        rows = {}
        for name, method in methods.items():  # each row as soon as it is known
            r = rows[name] = method()
            r["fits"] = fits(cfg, spec, plan, device, budget, r["found"])
            print(
                f"| {name} | {r['found']} | {r['found'] / truth:.3f} | {r['steps']} | "
                f"{r['seconds']:.1f} | {'yes' if r['fits'] else 'NO'} |",
                flush=True,
            )
    if args.out:
        args.out.write_text(json.dumps({"truth": truth, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
