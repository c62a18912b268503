"""Per-rank peak memory of real backend=fsdp training steps vs the memory probe's prediction.

Every rank of a real process group runs the launcher's own pieces: the memory probe
(launcher.memory.probe.measured_cap: one un-sharded step in this process, then the sharding
credit of launcher/memory/sharding.py) and the plan_only estimate (fake tensors, the same
credit); then it builds the model as a job does, shards it with the real FsdpBackend and runs
real steps through the loop's own step functions: the OOM-safe `_step_or_oom` (deferred
reduction) or, with trainer.oom_recovery=false, `train_step` (FSDP2's reduction in backward),
health check included. The last step's peak is compared with the prediction at its micro-batch.

Measured on CPU (gloo) by torch's MemTracker (torch.distributed._tools), a counter independent
of the probe's StorageMeter that also follows storage resizes (FSDP2 frees and re-allocates its
gathered parameters by resizing storages). It counts from before the model is built, so the
parameter shards and optimizer state are in it; `live_before_step` is what the last step starts
with. On CUDA (--device cuda, one process per GPU, NCCL) the allocator's own peak
(torch.cuda.max_memory_allocated over the last step) is measured.

    python -m torch.distributed.run --nproc_per_node 2 bench/fsdp_memory.py --micro 8 \\
        [--json OUT] -- +recipe=gpt_small model.layers=6 ... [trainer.oom_recovery=false]

    python bench/fsdp_memory.py --smoke   # seconds: itself on 2 gloo ranks, a 2 x 32 GPT, 2 steps

micro_batch stays auto (the probe runs) with max_micro_batch=--micro, which must be what the
cap allows. Rank 0 prints one JSON line: per rank the measured peak, the predictions (measured
probe and estimate) with and without the sharding credit, and the plan's memory row.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _tracker() -> Any:
    from torch.distributed._tools.mem_tracker import MemTracker

    class Totals(MemTracker):
        """torch's MemTracker for its totals: the per-module statistics (which refuse a module
        called twice while tracking, as accumulation does) are left out."""

        def _pre_fw_hook(self, *args: Any) -> None:
            pass

        def _post_fw_hook(self, *args: Any) -> None:
            pass

        def _pre_bw_hook(self, *args: Any) -> None:
            pass

        def _post_bw_hook(self, *args: Any) -> None:
            pass

    return Totals()


class _Meter:
    """The last step's peak and what it starts with: MemTracker's on CPU, the allocator's on
    CUDA (everything on the GPU is this run's)."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self.tracker = None if self.cuda else _tracker()

    def __enter__(self) -> _Meter:
        if self.tracker is not None:
            self.tracker.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tracker is not None:
            self.tracker.__exit__(*exc)

    def start_last_step(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        tracker = self.tracker
        tracker._peak_mem, tracker._peak_mem_snap = {}, {}  # the peak from here on
        return sum(d["Total"] for d in tracker.get_tracker_snapshot("current").values())

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return sum(d["Total"] for d in self.tracker.get_tracker_snapshot("peak").values())


SMOKE_GPT = ["+recipe=gpt_small", "model.layers=2", "model.width=32", "model.heads=2"]
SMOKE_GPT += ["data.seq_len=16", "global_batch=8"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro", type=int, help="required but with --smoke")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", default="")
    parser.add_argument("--smoke", action="store_true", help="2 ranks, a 2 x 32 GPT, 2 steps")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.smoke and "LOCAL_RANK" not in os.environ:  # not started by torchrun: start 2 ranks
        run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
        sys.exit(subprocess.run([*run, "2", __file__, *sys.argv[1:]]).returncode)
    if args.smoke:  # micro-batch 2 x accumulation 2 per rank
        args.micro, args.steps = 2, 2
        args.overrides = SMOKE_GPT + args.overrides
    if args.micro is None:
        parser.error("--micro is required")

    from launcher.backends.fsdp import FsdpBackend
    from launcher.config.compose import compose_run
    from launcher.data import data_spec, fake_batch
    from launcher.memory.probe import backend_overhead, estimated_cap, measured_cap
    from launcher.memory.profile import GB, MemoryProfile
    from launcher.models import build_model
    from launcher.models.loss import make_loss
    from launcher.optim import build_optimizer
    from launcher.planning.plan import PlanInput, plan_batch
    from launcher.training.guard import Health
    from launcher.training.job import on_device
    from launcher.training.loop import _step_or_oom, train_step
    from launcher.types.bundles import Settings, Trainee

    torch.set_num_threads(1)
    cache = tempfile.mkdtemp(prefix="fsdp-memory-")
    overrides = [*args.overrides, "backend=fsdp", f"max_micro_batch={args.micro}"]
    overrides += ["memory.cache=off", f"memory.cache_dir={cache}"]
    cfg = on_device(compose_run(overrides), args.device)
    backend = FsdpBackend(cfg, args.device)
    device = str(backend.device)
    world, rank = backend.world_size, backend.rank
    spec = data_spec(cfg.data)
    plan = plan_batch(PlanInput(cfg, world, 100_000))
    _, report = measured_cap(cfg, spec, plan, device, world, backend.all_min)
    _, estimate = estimated_cap(cfg, spec, plan, 64 * GB)
    credit = -backend_overhead(cfg, spec, plan)[0]

    def predicted(rep: dict[str, Any], credited: bool = True) -> int:
        lines = tuple(tuple(line) for line in rep["lines"])
        overhead = rep["overhead_bytes"] + (0 if credited else credit)
        return MemoryProfile(lines, overhead, (), "").peak(args.micro)

    plan = plan_batch(PlanInput(cfg, world, 100_000, memory=report))
    assert plan.micro_batch == args.micro, f"the plan's micro-batch is {plan.micro_batch}"
    dtype = getattr(torch, cfg.trainer.dtype)
    gc.collect()  # what the probe steps left is freed before counting starts
    with _Meter(args.device) as meter:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, spec, fresh=False).to(dtype)
        optimizer = build_optimizer(plan.optimizer, cfg.optim, model, plan.lr, plan.weight_decay)
        model, optimizer = backend.prepare(model, optimizer, plan)
        t = Trainee(model, optimizer, backend, backend.input_dtype(dtype), make_loss(cfg.loss, 0.0))
        settings = Settings(
            1,
            10**9,
            plan.oom_recovery,
            Health(cfg.trainer.spike_factor, cfg.trainer.diverge_factor),
        )
        batches = iter(lambda: fake_batch(spec, args.micro, device, dtype), None)
        for step in range(args.steps):
            if step == args.steps - 1:  # steady state: optimizer state made, buffers warm
                before = meter.start_last_step()
            if plan.oom_recovery:
                out = _step_or_oom(t, batches, plan, step, None, False, settings)
            else:
                out = train_step(t, batches, plan, None, False, settings)
            assert isinstance(out, torch.Tensor), f"step {step} was not applied: {out}"
        measured = meter.peak()
    row = {
        "rank": rank,
        "measured": measured,
        "live_before_step": before,
        "credit": credit,
        "probe": predicted(report),
        "probe_no_credit": predicted(report, credited=False),
        "estimate": predicted(estimate),
        "estimate_no_credit": predicted(estimate, credited=False),
    }
    rows = backend.gather_objects(row)
    if rank == 0:
        result = {
            "overrides": args.overrides,
            "device": args.device,
            "world_size": world,
            "micro_batch": plan.micro_batch,
            "accumulation": plan.accumulation,
            "oom_recovery": plan.oom_recovery,
            "ranks": rows,
            "memory_row": plan.reasons["memory"],
        }
        print(json.dumps(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
