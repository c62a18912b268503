"""One job, end to end: topology -> plan -> run directory -> build -> train -> outputs."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from launcher.backends import check as check_backend
from launcher.cluster.topology import Topology, resolve
from launcher.config.schema import ConfigError, RunConfig, to_dict
from launcher.data import declared_epoch_samples
from launcher.planning.plan import BatchPlan, format_plan, plan_batch
from launcher.training.metrics import check_trackers


def plan_for(
    cfg: RunConfig,
    launched: Topology,
    epoch: tuple[int, str] | None = None,
    memory: dict | None = None,
    origin: tuple[int, int] = (0, 0),
    stage: tuple | None = None,
) -> tuple[Topology, BatchPlan]:
    """Topology and plan; the epoch size is the data config's declared one unless given.
    `stage`: an adaptive ramp's batch, origin and history (plan_batch)."""
    topology = resolve(cfg.cluster, launched, cfg.plan_only)
    samples, source = epoch if epoch is not None else declared_epoch_samples(cfg.data)
    c = cfg.cluster
    if cfg.plan_only and c.declared_world_size is not None:
        each = "" if c.device_memory_gb == "auto" else f", {c.device_memory_gb:g} GiB each"
        shape = f"{c.nodes} nodes x {c.devices_per_node} {c.device} devices"
        where = f" = {shape} (cluster={c.name}{each})"
    else:
        where = f" {topology.device} process(es) on {topology.nodes} node(s), {topology.source}"
    plan = plan_batch(
        cfg,
        topology.world_size,
        samples,
        epoch_source=source,
        world_source=where,
        memory=memory,
        origin=origin,
        stage=stage,
    )
    check_backend(cfg, plan, topology.device)
    return topology, plan


def on_device(cfg: RunConfig, device: str) -> RunConfig:
    """The config with its device-dependent `auto` settings made concrete (config.yaml records
    them): mixed precision bf16 on CUDA (fp16 on GPUs without bf16), none on CPU; channels-last
    on CUDA."""
    backend, trainer = cfg.backend, cfg.trainer
    if backend.mixed_precision == "auto":
        backend = dataclasses.replace(backend, mixed_precision=_auto_precision(device))
    if trainer.channels_last == "auto":
        trainer = dataclasses.replace(trainer, channels_last=device == "cuda")
    return dataclasses.replace(cfg, backend=backend, trainer=trainer)


def _auto_precision(device: str) -> str:
    if device != "cuda":
        return "no"
    import torch

    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return "fp16"
    return "bf16"  # and for plan_only on a declared CUDA cluster without a GPU here


def probes_memory(cfg: RunConfig) -> bool:
    return cfg.memory.probe and cfg.micro_batch == "auto"


def estimated_memory(cfg: RunConfig, topology: Topology, plan: BatchPlan) -> dict:
    """plan_only: the profile estimated with fake tensors, against the declared device memory."""
    from launcher.data import data_spec
    from launcher.memory.probe import estimated_cap
    from launcher.memory.profile import GB, free_bytes

    declared = cfg.cluster.device_memory_gb
    if declared == "auto":
        device_bytes = free_bytes(topology.device, topology.local_world_size)
    else:
        device_bytes = int(declared * GB)
    return estimated_cap(cfg, data_spec(cfg.data), plan, device_bytes)[1]


def job_run_dir(cfg: RunConfig, stamp: str, job: int | None) -> Path:
    """run_dir, or outputs/<recipe>/<stamp>; in a sweep (job set) one numbered folder per job."""
    if job is None:
        return Path(cfg.run_dir or Path("outputs") / cfg.recipe / stamp)
    return Path(cfg.run_dir or Path("outputs") / cfg.recipe / f"multirun-{stamp}") / str(job)


def run_stamp() -> str:
    """The default run folder's name: slurm-<job id> under Slurm (a requeued job finds its run
    again and resumes), else the launch time."""
    job = os.environ.get("SLURM_JOB_ID")
    return f"slurm-{job}" if job else time.strftime("%Y-%m-%d_%H-%M-%S")


def reuses_run_dir(cfg: RunConfig) -> bool:
    """An explicit run_dir, or the Slurm job's: used as it is, never given a -2 suffix."""
    return cfg.run_dir is not None or "SLURM_JOB_ID" in os.environ


@dataclasses.dataclass(frozen=True)
class Jobs:
    """A validated launch: every job's overrides, config and run folder, and the processes."""

    overrides: list[list[str]]
    configs: list[RunConfig]
    run_dirs: list[Path]
    launched: Topology  # what trains: the processes trainer.devices starts, or what started us
    workers: int  # trainer.devices workers to start on this machine (0: this process trains)


def validate(
    overrides: list[str],
    multirun: bool,
    config_dir: Path | None = None,
    provided: dict[str, dict] | None = None,
    launched: Topology | None = None,
) -> Jobs:
    """Compose and check every job before anything is written: its config, its plan for the
    processes that will train it (`launched`: those a Hydra launcher plugin will start, else
    this process's), its trackers, its run folder."""
    from launcher.cluster.topology import from_env, local_processes, slurm_env
    from launcher.config.compose import compose_dict, split_sweep
    from launcher.config.schema import to_run_config

    jobs = split_sweep(overrides) if multirun else [overrides]
    configs = [to_run_config(compose_dict(job, config_dir) | (provided or {})) for job in jobs]
    for key in ("backend", "trainer.devices"):
        if len({_get(cfg, key) for cfg in configs}) > 1:
            raise ConfigError(
                f"-m: a sweep cannot vary {key} (it is fixed per process); launch one sweep per "
                "setting"
            )
    os.environ.update(slurm_env(os.environ))  # srun per device: torch's variables from Slurm's
    launched = launched or from_env()
    workers = max(local_processes(cfg, launched, _visible_gpus(launched)) for cfg in configs)
    # plan_only plans for the workers without starting them: the dry run is the real run
    workers_started = 0 if all(cfg.plan_only for cfg in configs) else workers
    if workers_started and provided:
        raise ConfigError(
            f"trainer.devices={configs[0].trainer.devices}: would start {workers} workers as "
            f"`python -m launcher`, which cannot rebuild the {', '.join(provided)} handed to "
            f"launcher.run(); start your script on every rank instead (torchrun --nproc_per_node "
            f"{workers} your_script.py), or set trainer.devices=1"
        )
    if workers:
        launched = Topology(workers, 0, 0, workers, launched.device, "trainer.devices", True)
    configs = [on_device(c, resolve(c.cluster, launched, c.plan_only).device) for c in configs]
    stamp = run_stamp()
    run_dirs = [job_run_dir(cfg, stamp, i if multirun else None) for i, cfg in enumerate(configs)]
    for cfg, run_dir in zip(configs, run_dirs, strict=True):
        plan_for(cfg, launched)
        check_trackers(cfg)
        if launched.rank == 0:  # one process checks: ranks sharing a file system would race
            _check_folders(cfg, run_dir)
        if (run_dir / "plan.json").exists() and (cfg.resume == "never" or cfg.plan_only):
            raise ConfigError(
                f"run_dir={str(run_dir)!r}: already holds a run; choose a new one (or resume=auto "
                "to continue it)"
            )
    return Jobs(jobs, configs, run_dirs, launched, workers_started)


def _check_folders(cfg: RunConfig, run_dir: Path) -> None:
    """The folders the job writes can be made and written (launcher/checkpoint/paths.py)."""
    from launcher.checkpoint.paths import check_writable

    check_writable(run_dir, "run_dir")
    if probes_memory(cfg) and cfg.memory.cache != "off":
        check_writable(cfg.memory.cache_dir, "memory.cache_dir")
    if isinstance(getattr(cfg.data, "cache_dir", None), str):
        check_writable(cfg.data.cache_dir, "data.cache_dir")


def launch(
    overrides: list[str],
    multirun: bool,
    config_dir: Path | None = None,
    provided: dict[str, dict] | None = None,
) -> list[dict[str, Any]]:
    """validate, then run the jobs in order in this process (or start trainer.devices workers on
    this machine that do). `provided`: config nodes that replace whole groups (launcher.run's
    objects). Returns each job's final evaluation and run_dir. The command line goes through
    launcher/hydra_app.py instead, which hands each job to Hydra."""
    from launcher.config.compose import config_dir_args

    jobs = validate(overrides, multirun, config_dir, provided)
    if jobs.workers:
        args = [*config_dir_args(config_dir), *(["-m"] * multirun), *overrides]
        start_workers(jobs.workers, args)
        return []
    results = []
    for i, (cfg, run_dir) in enumerate(zip(jobs.configs, jobs.run_dirs, strict=True)):
        if multirun:
            print(f"[multirun] job {i}: {' '.join(jobs.overrides[i])}", flush=True)
        if cfg.run_dir is None or jobs.launched.rank > 0:  # a default folder is new anyway
            results.append(execute(cfg, jobs.launched, run_dir))
            continue
        from launcher.checkpoint.lock import NAME, acquire, release

        acquire(run_dir)
        try:
            results.append(execute(cfg, jobs.launched, run_dir))
        finally:
            release(run_dir.absolute() / NAME, os.getpid())
    return results


def start_workers(workers: int, args: list[str]) -> None:
    """`python -m launcher ARGS` as `workers` local processes (launcher/cluster/spawn.py)."""
    from launcher.cluster.spawn import spawn

    if "launcher.data.user" in sys.modules:  # the plan counted your data; workers build theirs
        sys.modules["launcher.data.user"].release()
    spawn(workers, args)


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _visible_gpus(launched: Topology) -> int:
    if launched.device != "cuda":
        return 0
    import torch

    return torch.cuda.device_count()


def create_run_dir(path: Path, explicit: bool) -> Path:
    """Create the run directory; a default one that exists already gets a -2, -3 ... suffix."""
    if explicit:
        path.mkdir(parents=True, exist_ok=True)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = path, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
            candidate = path.with_name(f"{path.name}-{n}")


def write_plan_files(run_dir: Path, cfg: RunConfig, plan: BatchPlan, device: str) -> None:
    """config.yaml, plan.json and, for DeepSpeed, the ds_config.json the plan implies."""
    import yaml

    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (run_dir / "plan.json").write_text(json.dumps(dataclasses.asdict(plan), indent=2) + "\n")
    from launcher.backends import write_config

    write_config(run_dir, cfg, plan, device)


def stop_message(stop: list[Any], step: int, plan: BatchPlan, path: Path | None, main: bool) -> str:
    """What happened on a SIGUSR1/SIGTERM; rank 0 requeues the Slurm job on SIGUSR1."""
    from launcher.cluster import preemption

    stop = sorted(set(stop) | set(preemption.signals(preemption.received())))  # also mid-save
    names = " and ".join(s.name for s in stop)
    head = f"launcher: stopped by {names} after step {step:,} of {plan.steps:,}"
    if not plan.checkpoints:
        return f"{head}: checkpoints are off, nothing saved, not requeued (see the plan)"
    if any(sig in stop for sig in preemption.STOPS):  # scancel, Ctrl-C, or a scheduler
        return f"{head}; checkpoint {path}; rerun the same command (resume=auto) to continue"
    if not main:
        return head
    job = os.environ.get("SLURM_JOB_ID")
    if job:  # Slurm kills the job within ~0.1 s of the requeue: say it first
        print_error(f"{head}; checkpoint {path}; requeueing Slurm job {job}")
    return f"{head}; checkpoint {path}; {preemption.requeue()}"


def print_error(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def with_budget(cfg: RunConfig, plan: BatchPlan, run_dir: Path) -> BatchPlan:
    """The plan with its budget row: are trainer.epochs enough at this batch, judged from the
    newest earlier run of the same workload next to run_dir (launcher/planning/prior.py)."""
    from launcher.planning.prior import budget, find_prior

    prior = find_prior(cfg, run_dir.parent, exclude=run_dir)
    if prior is None:
        return plan
    value, why = budget(prior, plan.global_batch, plan.total_samples, plan.epoch_samples)
    return dataclasses.replace(plan, budget=value, reasons=plan.reasons | {"budget": why})


def estimated_plan(cfg: RunConfig, launched: Topology) -> tuple[Topology, BatchPlan]:
    """The plan_only plan: for the declared cluster, with the memory estimated, not measured."""
    cfg = on_device(cfg, resolve(cfg.cluster, launched, cfg.plan_only).device)
    epoch = declared_epoch_samples(cfg.data)  # once: a text corpus is counted by listing files
    topology, plan = plan_for(cfg, launched, epoch)
    if probes_memory(cfg):
        _, plan = plan_for(cfg, launched, epoch, estimated_memory(cfg, topology, plan))
    else:  # the estimate's steps would have checked that model, data and loss fit together
        from launcher.data import data_spec
        from launcher.memory.probe import check_fit

        check_fit(cfg, data_spec(cfg.data), plan, topology.device)
    return topology, plan


def execute(cfg: RunConfig, launched: Topology, run_dir: Path) -> dict[str, Any]:
    """Plan, and unless plan_only, train. Returns the final evaluation (empty under plan_only)."""
    cfg = on_device(cfg, resolve(cfg.cluster, launched, cfg.plan_only).device)
    if cfg.plan_only:
        topology, plan = estimated_plan(cfg, launched)
        plan = with_budget(cfg, plan, run_dir)
        run_dir = create_run_dir(run_dir, reuses_run_dir(cfg))
        write_plan_files(run_dir, cfg, plan, topology.device)
        print(format_plan(plan), f"\nplan written to {run_dir}", sep="\n", flush=True)
        return {"run_dir": str(run_dir)}
    from launcher.cluster import preemption

    with preemption.handled():
        return _train(cfg, launched, run_dir)


def _train(cfg: RunConfig, launched: Topology, run_dir: Path) -> dict[str, Any]:
    import torch

    from launcher.backends import build_backend
    from launcher.backends.ds_config import check_buffers
    from launcher.checkpoint import files as checkpoint
    from launcher.checkpoint import resume
    from launcher.cluster import preemption
    from launcher.data import build_splits, eval_loader, loader_settings, train_loader
    from launcher.models import build_model
    from launcher.optim import build_optimizer
    from launcher.training import faults
    from launcher.training.guard import Diverged, Health, params_finite, state_message
    from launcher.training.loop import check_replicas, fit
    from launcher.training.loss import build_loss
    from launcher.training.metrics import MetricsSink, open_trackers

    topology = resolve(cfg.cluster, launched, cfg.plan_only)  # launch() validated the plan
    if cfg.trainer.cpu_threads:
        torch.set_num_threads(cfg.trainer.cpu_threads)
    if topology.device == "cuda":  # before the memory probe: its verify step autotunes too
        torch.backends.cudnn.benchmark = cfg.trainer.cudnn_benchmark
    splits = build_splits(cfg.data)
    epoch = (len(splits.train), " (counted in the training split)")
    _, plan = plan_for(cfg, launched, epoch)
    dtype = getattr(torch, cfg.trainer.dtype)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, splits.spec, fresh=False).to(dtype)
    loss_fn = build_loss(cfg)
    if cfg.trainer.channels_last:  # 4-D weights only: other models are unchanged
        model = model.to(memory_format=torch.channels_last)
    check_buffers(cfg, [n for n, b in model.named_buffers() if b.is_floating_point()])
    warn = print_error if topology.rank == 0 else lambda _: None
    found = resume.find(cfg, run_dir, warn) if plan.checkpoints else None
    origin, stage = (0, 0), None
    if found is not None:
        origin = resume.check(cfg, *found)
        stage = resume.adaptive_stage(cfg, found[0])
        _, plan = plan_for(cfg, launched, epoch, origin=origin, stage=stage)
        resume.check_optimizer(found[0], plan, found[1])
    elif (run_dir / "plan.json").exists():  # launch() allowed it: resume=auto
        if (run_dir / "model_final.pt").exists():
            saved = (run_dir / "checkpoints").is_dir()
            why = "none of its checkpoints is usable" if saved else "checkpoints were off"
            raise ConfigError(
                f"run_dir={str(run_dir)!r}: holds a finished run without a checkpoint to resume "
                f"({why}); choose a new run_dir"
            )
        warn(f"launcher: no usable checkpoint in {run_dir}: starting over")

    backend = build_backend(cfg, topology.device)
    if backend.world_size != topology.world_size:
        raise RuntimeError(
            f"backend sees {backend.world_size} processes, the environment says "
            f"{topology.world_size}"
        )
    report = None
    if probes_memory(cfg):
        from launcher.memory.probe import measured_cap

        _, report = measured_cap(
            cfg, splits.spec, plan, str(backend.device), topology.local_world_size, backend.all_min
        )
        _, plan = plan_for(cfg, launched, epoch, report, origin, stage)  # RNG state kept
    else:  # the probe's steps would have checked that model, data and loss fit together
        from launcher.memory.probe import check_fit

        check_fit(cfg, splits.spec, plan, str(backend.device))
    optimizer = build_optimizer(plan.optimizer, cfg.optim, model, plan.lr, plan.weight_decay)
    main = backend.rank == 0
    if main:
        plan = with_budget(cfg, plan, run_dir)
    run_dir = backend.broadcast_object(
        create_run_dir(run_dir, reuses_run_dir(cfg)) if main else None
    )
    if main:
        write_plan_files(run_dir, cfg, plan, topology.device)
        print(format_plan(plan), f"run directory: {run_dir}", sep="\n", flush=True)

    if cfg.trainer.compile:  # in place: state-dict keys stay the plain module's
        model.compile()
    model, optimizer = backend.prepare(model, optimizer, plan)
    start_step = 0
    if found is not None:
        state, path = found
        how = resume.restore(state, backend, model, optimizer)
        start_step = state["step"]
        if main:
            print(
                f"launcher: resuming from {path}: step {start_step:,} of {plan.steps:,} "
                f"({state['consumed_samples']:,} samples consumed, saved on "
                f"{state['world_size']} rank(s)); {how}",
                flush=True,
            )
            if state["global_batch"] != plan.global_batch:
                print_error(
                    f"launcher: GLOBAL BATCH CHANGED on resume: {state['global_batch']} -> "
                    f"{plan.global_batch} from {state['consumed_samples']:,} samples on "
                    "(checkpoint.allow_global_batch_change=true); LR and warmup follow the "
                    f"scaling rule for {plan.global_batch}, the schedule continues in samples"
                )
    loading = loader_settings(cfg.data, topology.device)
    evals: dict[int, Any] = {}  # one evaluation loader per micro-batch: its workers persist

    def batches_from(plan: BatchPlan, step: int) -> Any:
        return train_loader(splits.train, plan, backend.rank, cfg.seed, step, loading)

    def eval_batches(plan: BatchPlan) -> Any:
        if plan.micro_batch not in evals:
            evals.clear()
            evals[plan.micro_batch] = eval_loader(splits.eval, plan, backend.rank, loading)
        return evals[plan.micro_batch]

    progress = found[0].get("progress", {}) if found is not None else {}
    sink = MetricsSink(
        run_dir if main else None,
        total_steps=plan.end_step,
        tensorboard=cfg.trainer.tensorboard,
        progress=cfg.trainer.progress,
        resume_step=start_step,
        resume_samples=plan.samples_at(start_step),
        train_s=progress.get("train_s", 0.0),
        trackers=open_trackers(cfg, run_dir, dataclasses.asdict(plan)) if main else None,
    )
    meter = None
    if plan.noise != "off":
        from launcher.batchsize.meter import NoiseMeter
        from launcher.planning.plan import noise_window_samples

        window = noise_window_samples(cfg, plan.epoch_samples)
        meter = NoiseMeter(backend, window, cfg.trainer.noise_split_every)
        if "noise" in progress:
            meter.load_state_dict(progress["noise"])
    if found is not None:
        was = found[0]["global_batch"]
        sink.log({"event": "resumed", "step": start_step, "from": str(found[1]), "was": was})
    last_save = time.monotonic()

    def after_step(step: int, plan: BatchPlan) -> None:
        """Save a checkpoint when one is due (by samples, by rank 0's clock, at the end) or when
        any rank got SIGUSR1/SIGTERM; in the latter case stop after it (preemption.py)."""
        nonlocal last_save
        faults.test_kill(step, "step")
        c = cfg.checkpoint
        due = step == plan.end_step
        if c.every_samples:
            before = plan.samples_at(step - 1)
            due |= plan.samples_at(step) // c.every_samples > before // c.every_samples
        late = main and c.every_minutes and time.monotonic() - last_save >= 60 * c.every_minutes
        bits = 0
        for flag in backend.flags(int(late) | preemption.received()):  # rank 0's clock for all
            bits |= flag
        stop = [] if step == plan.end_step else preemption.signals(bits)
        due |= bool(bits & 1) or bool(stop)
        path = None
        if due and plan.checkpoints:
            if any(backend.flags(int(not params_finite(model)))):  # never a non-finite checkpoint
                raise Diverged(state_message(step, "checkpoint"))
            sink.pause()  # saving is not training time
            measured = {"train_s": sink.train_seconds()}
            if meter is not None:
                meter.flush()
                measured["noise"] = meter.state_dict()
            state = resume.capture(cfg, plan, step, backend, model, optimizer, measured)
            if main:
                path = checkpoint.save(run_dir, step, state, cfg.checkpoint.keep)
                sink.log({"event": "checkpoint", "step": step, "path": str(path)})
            last_save = time.monotonic()
            sink.resume()
        if stop:
            sink.log({"event": "stopped", "step": step, "signals": [s.name for s in stop]})
            message = stop_message(stop, step, plan, path, main)
            faults.test_kill(step, "stopping")
            raise preemption.Stopped(message)

    def on_oom(old: BatchPlan, new: BatchPlan, step: int, ranks: list[int]) -> None:
        message = (
            f"launcher: OUT OF MEMORY on rank(s) {ranks} at step {step} with micro-batch "
            f"{old.micro_batch}: dropped the partial step on every rank; rerunning its samples "
            f"with micro-batch {new.micro_batch} x accumulation {new.accumulation} (global batch "
            f"{new.global_batch}, LR and schedule unchanged)"
        )
        sink.log(
            {
                "event": "out_of_memory",
                "step": step,
                "samples": old.samples_at(step),
                "ranks": ranks,
                "micro_batch": new.micro_batch,
                "accumulation": new.accumulation,
            }
        )
        if main:
            print(message, file=sys.stderr, flush=True)
            if new.ramp or not plan.ramp:  # not for a ramp-up stage: plan.json keeps the ramp
                write_plan_files(run_dir, cfg, new, topology.device)
        if report is not None:
            from launcher.memory.probe import record_oom

            record_oom(cfg, splits.spec, old, str(backend.device), report, old.micro_batch)

    def grow(step: int, current: BatchPlan, noise: float | None) -> BatchPlan | None:
        """The adaptive ramp's decision at a log step (rank 0's), and the plan it leads to."""
        from launcher.planning.adaptive import decide, event

        factor, steps = cfg.ramp.noise_factor, step - current.origin_step
        batch = decide(
            current.global_batch, cfg.global_batch, noise, steps, cfg.ramp.min_steps, factor
        )
        batch = backend.flags(batch or 0)[0]
        if not batch:
            return None
        before = (current.origin_step, current.origin_samples, current.global_batch)
        stage = (batch, step, current.samples_at(step), (*current.grown, before))
        _, larger = plan_for(cfg, launched, epoch, report, stage=stage)
        record, line = event(current, larger, noise, factor)
        sink.log(record)
        if main:
            print(line, flush=True)
            write_plan_files(run_dir, cfg, larger, topology.device)
        return larger

    if backend.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(backend.device)  # the probe steps are not training
    try:
        result, plan = fit(
            model,
            optimizer,
            plan,
            backend,
            batches_from,
            eval_batches,
            sink,
            log_every=cfg.trainer.log_every,
            eval_every_samples=round(cfg.trainer.eval_every_epochs * plan.epoch_samples),
            dtype=backend.input_dtype(dtype),
            start_step=start_step,
            oom_recovery=plan.oom_recovery,
            on_oom=on_oom,
            after_step=after_step,
            meter=meter,
            loss_fn=loss_fn,
            grow=grow if cfg.ramp.mode == "adaptive" else None,
            health=Health(cfg.trainer.spike_factor),
            skip_spikes=cfg.trainer.skip_spikes,
            nonfinite_limit=cfg.trainer.nonfinite_limit,
        )
        final = {"final": True, "step": plan.end_step, "samples": plan.samples_at(plan.end_step)}
        if plan.stop_step is not None:  # ended early: resuming without the stop trains on
            final["stopped_early"] = True
        if backend.device.type == "cuda":  # what training needed, against the plan's prediction
            final["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(backend.device)
        with backend.gathered(model):
            final["param_digest"] = check_replicas(model, backend, plan.end_step)
            weights = backend.state_dict(model)
        if main:
            _save_final(weights, run_dir / "model_final.pt")
        if main and plan.noise != "off":  # the throughput curve of the batch-size advice
            from launcher.batchsize import speed

            largest = speed.largest_micro(plan, cfg.max_micro_batch, len(splits.train))
            sizes = speed.ladder(plan.micro_batch, largest)
            times = speed.time_micro_steps(
                model, backend, splits.train, sizes, backend.input_dtype(dtype), loss_fn
            )
            sink.log({"step": plan.end_step, **times})
        sink.log(final)
    finally:
        sink.close()
    if main:
        accuracy = result.get("eval_accuracy")  # not for a loss of your own that is no classifier
        print(
            (f"test accuracy {accuracy:.4f} " if accuracy is not None else "test ")
            + f"({result['eval_samples']:,} samples), eval loss {result['eval_loss']:.4f}",
            flush=True,
        )
        print_advice(run_dir, plan, cfg)
    return {**result, "run_dir": str(run_dir)}


def _save_final(weights: dict[str, Any], path: Path) -> None:
    """model_final.pt, or WriteFailed (one line) with no partial file left."""
    import torch

    try:
        torch.save(weights, path)
    except OSError as exc:
        from launcher.checkpoint.paths import WriteFailed

        path.unlink(missing_ok=True)
        raise WriteFailed("the final weights", path, exc) from None


def print_advice(run_dir: Path, plan: BatchPlan, cfg: RunConfig) -> None:
    """The batch-size advice from the run's metrics (launcher/batchsize/advice.py), or why there is
    none; the run's ramp decisions, loss spikes and branched probes (launcher/batchsize/history.py);
    the next run in a sentence."""
    from launcher.batchsize.advice import advise, format_advice
    from launcher.batchsize.history import format_history, probes
    from launcher.batchsize.sweep import read_job
    from launcher.planning.prior import from_records

    records = read_job(run_dir)[1]
    own = from_records(run_dir, plan.global_batch, records, cfg.target_accuracy)
    reached = (own.target, own.samples) if own is not None and own.samples else None
    advice = advise(records, dataclasses.asdict(plan), reached)
    if advice is None:
        why = "not measured" if plan.noise == "off" else "too few steps measured"
        print(f"batch-size advice: none (noise scale {why}; see the plan's noise_scale row)")
    else:
        print(format_advice(advice), flush=True)
    lines = format_history(records, probes(run_dir))
    if advice is not None:
        lines.append(next_sentence(cfg, advice, plan.memory.get("cap")))
    if lines:
        print("\n".join(lines), flush=True)


def next_sentence(cfg: RunConfig, advice: Any, cap: int | None) -> str:
    """advice.next_run with the LR the plan would give the recommended batch."""
    from launcher.batchsize.advice import next_run
    from launcher.planning.plan import choose_optimizer, scale_lr

    batch = advice.recommended
    optimizer = choose_optimizer(cfg.optim, batch)[0]
    lr, rule, _ = scale_lr(cfg.optim, batch, optimizer)
    per_node = cfg.cluster.devices_per_node
    per_node = per_node if isinstance(per_node, int) else None
    return next_run(advice, lr, f"{optimizer}, the {rule} rule", cap, per_node)
