"""One job's training, in the order it happens: set up (data, model, first plan), find the
checkpoint to resume, prepare (backend, memory probe, optimizer, run folder, the plan printed),
restore, train (the loop with its hooks), finish (final record, weights, advice).

`train_job` reads top to bottom; each phase is a function of the Job built so far.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from launcher import faults, log
from launcher.backends import build_backend
from launcher.backends.ds_config import check_buffers
from launcher.batchsize.meter import NoiseMeter
from launcher.batchsize.run_advice import print_advice
from launcher.checkpoint import resume
from launcher.checkpoint.files import torch_save
from launcher.checkpoint.paths import WriteFailed
from launcher.cluster import preemption
from launcher.cluster.topology import Topology, resolve
from launcher.config.schema import ConcreteConfig
from launcher.data import Source, Splits, build_splits, eval_loader, loader_settings, train_loader
from launcher.data.stream import Snapshots
from launcher.errors import ConfigError
from launcher.memory.probe import check_fit, check_model_fits, measured_cap, record_oom
from launcher.models import build_model
from launcher.models.loss import CrossEntropy, UserLoss, make_loss
from launcher.models.outputs import context_length, shifts_labels
from launcher.optim import build_optimizer
from launcher.planning.adaptive import decide, event
from launcher.planning.length import noise_window_samples
from launcher.planning.render import format_plan
from launcher.training import speed
from launcher.training.checkpointer import Checkpointer
from launcher.training.evaluation import check_replicas
from launcher.training.guard import Health
from launcher.training.job_plan import Facts, plan_for, probes_memory, with_budget
from launcher.training.loop import fit
from launcher.training.metrics import MetricsSink, open_trackers
from launcher.training.run_folder import create_run_dir, reuses_run_dir, write_plan_files
from launcher.types.backend import Backend
from launcher.types.bundles import Feed, Hooks, Settings, Trainee
from launcher.types.plan import AdaptiveStage, BatchPlan
from launcher.types.state import CheckpointState, Progress


class PreparedOptimizer(Protocol):
    """The optimizer a backend's `prepare` returns: torch's, Accelerate's wrapper of it, or
    DeepSpeed's ZeRO optimizer (no torch Optimizer). The loop sets each group's LR; the backend
    steps, saves and loads it."""

    param_groups: list[dict[str, Any]]


@dataclass
class Job:
    """What the phases build and share. `plan` is re-made as facts arrive (`facts`: the data's
    size, the checkpoint's origin and stage, the measured memory; launcher/training/job_plan.py)."""

    cfg: ConcreteConfig
    launched: Topology
    run_dir: Path
    topology: Topology
    splits: Splits
    facts: Facts  # what `plan` was made from
    plan: BatchPlan
    model: torch.nn.Module  # from prepare on: as the backend wrapped it (DDP, DeepSpeed's engine)
    loss_fn: CrossEntropy | UserLoss
    dtype: torch.dtype
    sources: tuple[Source, Source]  # (train, eval) as the loaders read them
    snapshots: Snapshots  # a stream's saved places by position (launcher/data/stream.py)
    found: tuple[CheckpointState, Path] | None = None  # the checkpoint to resume: (state, path)
    optimizer: PreparedOptimizer | None = None  # from prepare on
    _backend: Backend | None = None  # built by prepare

    @property
    def backend(self) -> Backend:
        """The backend, from `prepare` on (the phases after it use it)."""
        if self._backend is None:
            raise RuntimeError("a phase used the job's backend before prepare built it")
        return self._backend

    @backend.setter
    def backend(self, backend: Backend) -> None:
        self._backend = backend

    @property
    def main(self) -> bool:
        if self._backend is not None:
            return self._backend.rank == 0
        return self.topology.rank == 0

    def replan(self, facts: Facts) -> None:
        """The plan for `facts`; none is made when they are the plan's own (the same plan)."""
        if facts != self.facts:
            self.facts, self.plan = facts, plan_for(self.cfg, self.launched, facts).plan


def train_job(cfg: ConcreteConfig, launched: Topology, run_dir: Path) -> dict[str, Any]:
    """Train one job; returns its final evaluation and run folder."""
    job = set_up(cfg, launched, run_dir)
    find_checkpoint(job)
    prepare(job)
    start_step = restore(job)
    result, plan = train(job, start_step)
    return finish(job, result, plan)


def set_up(cfg: ConcreteConfig, launched: Topology, run_dir: Path) -> Job:
    """Threads and cuDNN, the data, the first plan, the model (seeded) and the loss."""
    topology = resolve(cfg.cluster, launched, cfg.plan_only)  # launch() validated the plan
    if cfg.trainer.cpu_threads:
        torch.set_num_threads(cfg.trainer.cpu_threads)
    if topology.device == "cuda":  # before the memory probe: its verify step autotunes too
        torch.backends.cudnn.benchmark = cfg.trainer.cudnn_benchmark
    faults.test_kill(0, "preparing")  # a test's signal while the data is prepared
    splits = build_splits(cfg.data)
    facts = Facts(splits.epoch())  # counted: validate planned the epoch the config declares
    plan = plan_for(cfg, launched, facts).plan
    check_model_fits(cfg, splits.spec, plan, topology.device, topology.local_world_size)
    dtype = getattr(torch, cfg.trainer.dtype)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, splits.spec, fresh=False).to(dtype)
    loss_fn = make_loss(cfg.loss, cfg.trainer.label_smoothing)
    if cfg.trainer.channels_last:  # 4-D weights only: other models are unchanged
        model = model.to(memory_format=torch.channels_last)
    check_buffers(cfg.backend, [n for n, b in model.named_buffers() if b.is_floating_point()])
    _check_context(cfg.data, model)
    budget = getattr(cfg.data, "micro_batch_tokens", 0)
    sources = splits.sources(shift=shifts_labels(model), budget=budget)
    return Job(
        cfg,
        launched,
        run_dir,
        topology,
        splits,
        facts,
        plan,
        model,
        loss_fn,
        dtype,
        sources,
        Snapshots(),
    )


def _check_context(data: Any, model: Any) -> None:
    """A packed sequence the model can take: data.pack_length within its context (positions)."""
    length = getattr(data, "pack_length", 0)
    context = context_length(model) if length else None
    if context is not None and length > context:
        raise ConfigError(
            f"data.pack_length={length}: longer than the model's context of {context} positions "
            "(its max_position_embeddings); pack at most that many tokens"
        )


def find_checkpoint(job: Job) -> None:
    """The newest usable checkpoint of run_dir, checked against this run; the plan re-made from
    its origin (a global batch changed) or its adaptive stage, if it has either. A finished run
    without one is refused."""
    cfg, run_dir = job.cfg, job.run_dir
    found = resume.find(cfg.resume, run_dir, log.warn) if job.plan.checkpoints else None
    if found is not None:
        job.found = found
        origin = resume.check(cfg, *found)
        stage = resume.adaptive_stage(cfg.ramp, found[0])
        job.replan(dataclasses.replace(job.facts, origin=origin, stage=stage))
        resume.check_optimizer(found[0], job.plan, found[1])
    elif (run_dir / "plan.json").exists():  # launch() allowed it: resume=auto
        if (run_dir / "model_final.pt").exists():
            saved = (run_dir / "checkpoints").is_dir()
            why = "none of its checkpoints is usable" if saved else "checkpoints were off"
            raise ConfigError(
                f"run_dir={str(run_dir)!r}: holds a finished run without a checkpoint to resume "
                f"({why}); choose a new run_dir"
            )
        log.warn(f"launcher: no usable checkpoint in {run_dir}: starting over")


def prepare(job: Job) -> None:
    """The backend; the memory probe (or the fit check) and the plan it caps; the optimizer;
    the run folder (rank 0 makes it, every rank gets its path) with the plan written and
    printed; compile; the backend's prepare."""
    cfg, topology = job.cfg, job.topology
    backend = job.backend = build_backend(cfg, topology.device)
    if backend.world_size != topology.world_size:
        raise RuntimeError(
            f"backend sees {backend.world_size} processes, the environment says "
            f"{topology.world_size}"
        )
    device = str(backend.device)
    if probes_memory(cfg.memory, cfg.micro_batch):
        local = topology.local_world_size
        _, report = measured_cap(cfg, job.splits.spec, job.plan, device, local, backend.all_min)
        job.replan(dataclasses.replace(job.facts, memory=report))  # RNG state kept
    else:  # the probe's steps would have checked that model, data and loss fit together
        check_fit(cfg, job.splits.spec, job.plan, device)
    plan = job.plan
    optimizer = build_optimizer(plan.optimizer, cfg.optim, job.model, plan.lr, plan.weight_decay)
    if job.main:
        job.plan = with_budget(cfg, job.plan, job.run_dir)
    made = create_run_dir(job.run_dir, reuses_run_dir(cfg.run_dir)) if job.main else None
    job.run_dir = backend.broadcast_object(made)
    if job.main:
        write_plan_files(job.run_dir, cfg, job.plan, topology.device)
        log.info(f"{format_plan(job.plan)}\nrun directory: {job.run_dir}")
    if cfg.trainer.compile:  # in place: state-dict keys stay the plain module's
        job.model.compile()
    job.model, job.optimizer = backend.prepare(job.model, optimizer, job.plan)


def restore(job: Job) -> int:
    """The checkpoint's weights and optimizer state (exactly, or re-sharded for another world
    size); returns the step to start from."""
    if job.found is None:
        return 0
    state, path = job.found
    how = resume.restore(state, path, job.backend, job.model, job.optimizer)
    start_step: int = state["step"]
    plan = job.plan
    if job.main:
        log.info(
            f"launcher: resuming from {path}: step {start_step:,} of {plan.steps:,} "
            f"({state['consumed_samples']:,} samples consumed, saved on "
            f"{state['world_size']} rank(s)); {how}"
        )
        if state["global_batch"] != plan.global_batch:
            log.warn(
                f"launcher: GLOBAL BATCH CHANGED on resume: {state['global_batch']} -> "
                f"{plan.global_batch} from {state['consumed_samples']:,} samples on "
                "(checkpoint.allow_global_batch_change=true); LR and warmup follow the "
                f"scaling rule for {plan.global_batch}, the schedule continues in samples"
            )
    return start_step


def _feed(job: Job) -> Any:
    """The train stream per plan and step, and one evaluation loader per micro-batch (its
    workers persist)."""
    loading = loader_settings(job.cfg.data, job.topology.device)
    (train, evaluation), rank, seed = job.sources, job.backend.rank, job.cfg.seed
    evals: dict[int, Any] = {}

    def eval_batches(plan: BatchPlan) -> Any:
        if plan.micro_batch not in evals:
            evals.clear()
            evals[plan.micro_batch] = eval_loader(evaluation, plan, rank, loading)
        return evals[plan.micro_batch]

    def train_batches(plan: BatchPlan, step: int) -> Any:
        return train_loader(train, plan, rank, seed, step, loading, job.snapshots)

    return Feed(train_batches, eval_batches)


def _progress(job: Job) -> Progress:
    """What the checkpoint resumed from measured so far (training seconds, the noise meter's
    averages, the loss at the start); empty for a fresh run."""
    return job.found[0].get("progress", {}) if job.found is not None else {}


def _outputs(job: Job, start_step: int) -> tuple[Any, Any]:
    """The metrics sink (rank 0 writes) and the noise meter, both continued from a checkpoint."""
    cfg, plan, main = job.cfg, job.plan, job.main
    progress = _progress(job)
    sink = MetricsSink(
        job.run_dir if main else None,
        total_steps=plan.end_step,
        tensorboard=cfg.trainer.tensorboard,
        progress=cfg.trainer.progress,
        resume_step=start_step,
        resume_samples=plan.samples_at(start_step),
        train_s=progress.get("train_s", 0.0),
        trackers=open_trackers(cfg, job.run_dir, dataclasses.asdict(plan)) if main else None,
    )
    meter = None
    if plan.noise != "off":
        window = noise_window_samples(cfg.trainer, plan.epoch_samples)
        meter = NoiseMeter(job.backend, window, cfg.trainer.noise_split_every)
        if "noise" in progress:
            meter.load_state_dict(progress["noise"])
    if job.found is not None:
        was, path = job.found[0]["global_batch"], job.found[1]
        sink.log({"event": "resumed", "step": start_step, "from": str(path), "was": was})
    return sink, meter


class _Events:
    """The job's answers to the loop's out-of-memory and adaptive-ramp events."""

    def __init__(self, job: Job, sink: Any) -> None:
        self.job, self.sink = job, sink

    def on_oom(self, old: BatchPlan, new: BatchPlan, step: int, ranks: list[int]) -> None:
        job = self.job
        self.sink.log(
            {
                "event": "out_of_memory",
                "step": step,
                "samples": old.samples_at(step),
                "ranks": ranks,
                "micro_batch": new.micro_batch,
                "accumulation": new.accumulation,
            }
        )
        if job.main:
            log.warn(
                f"launcher: OUT OF MEMORY on rank(s) {ranks} at step {step} with micro-batch "
                f"{old.micro_batch}: dropped the partial step on every rank; rerunning its "
                f"samples with micro-batch {new.micro_batch} x accumulation {new.accumulation} "
                f"(global batch {new.global_batch}, LR and schedule unchanged)"
            )
            if new.ramp or not job.plan.ramp:  # not for a ramp-up stage: plan.json keeps the ramp
                write_plan_files(job.run_dir, job.cfg, new, job.topology.device)
        report = job.facts.memory  # the probe's (None: not probed)
        if report is not None:
            device = str(job.backend.device)
            record_oom(job.cfg, job.splits.spec, old, device, report, old.micro_batch)

    def grow(self, step: int, current: BatchPlan, noise: float | None) -> BatchPlan | None:
        """The adaptive ramp's decision at a log step (rank 0's), and the plan it leads to."""
        job = self.job
        ramp = job.cfg.ramp
        steps = step - current.origin_step
        batch = decide(
            current.global_batch,
            job.cfg.global_batch,
            noise,
            steps,
            ramp.min_steps,
            ramp.noise_factor,
        )
        batch = job.backend.flags(batch or 0)[0]
        if not batch:
            return None
        assert noise is not None  # rank 0 grew on it, and every rank's is the same (a collective)
        before = (current.origin_step, current.origin_samples, current.global_batch)
        stage = AdaptiveStage(batch, step, current.samples_at(step), (*current.grown, before))
        larger = plan_for(job.cfg, job.launched, dataclasses.replace(job.facts, stage=stage)).plan
        record, line = event(current, larger, noise, ramp.noise_factor)
        self.sink.log(record)
        if job.main:
            log.info(line)
            write_plan_files(job.run_dir, job.cfg, larger, job.topology.device)
        return larger


def train(job: Job, start_step: int) -> tuple[dict[str, float], BatchPlan]:
    """The loop from `start_step`, checkpoints and stops by the Checkpointer, then the final
    record: replica check, weights, the speed ladder for the advice. The sink is closed."""
    cfg, backend = job.cfg, job.backend
    t = Trainee(job.model, job.optimizer, backend, backend.input_dtype(job.dtype), job.loss_fn)
    sink, meter = _outputs(job, start_step)
    events = _Events(job, sink)
    progress = _progress(job)
    start = progress.get("loss_start")  # the loss divergence is measured against
    if isinstance(progress.get("stream"), dict):  # a stream's saved place at the checkpoint
        job.snapshots.found[progress["stream"]["position"]] = progress["stream"]
    health = Health(cfg.trainer.spike_factor, cfg.trainer.diverge_factor, start)
    saver = Checkpointer(cfg, job.run_dir, t, sink, meter, health, job.snapshots)
    hooks = Hooks(
        after_step=saver.after_step,
        on_oom=events.on_oom,
        grow=events.grow if cfg.ramp.mode == "adaptive" else None,
    )
    settings = Settings(
        log_every=cfg.trainer.log_every,
        eval_every_samples=round(cfg.trainer.eval_every_epochs * job.plan.epoch_samples),
        oom_recovery=job.plan.oom_recovery,
        health=health,
        skip_spikes=cfg.trainer.skip_spikes,
        nonfinite_limit=cfg.trainer.nonfinite_limit,
    )
    if backend.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(backend.device)  # the probe steps are not training

    preemption.training()  # a signal now stops the run at a step boundary, with a checkpoint
    try:
        result, plan = fit(
            t, job.plan, _feed(job), sink, settings, start_step=start_step, meter=meter, hooks=hooks
        )
        sink.log(_final_record(job, t, plan, sink))
    finally:
        sink.close()
    return result, plan


def _final_record(job: Job, t: Any, plan: BatchPlan, sink: Any) -> dict[str, Any]:
    """The run's last metrics line; the replicas checked equal, model_final.pt written, and the
    micro-step timings of the batch-size advice logged before it."""
    backend = t.backend
    final: dict[str, Any] = {
        "final": True,
        "step": plan.end_step,
        "samples": plan.samples_at(plan.end_step),
    }
    if plan.stop_step is not None:  # ended early: resuming without the stop trains on
        final["stopped_early"] = True
    if backend.device.type == "cuda":  # what training needed, against the plan's prediction
        final["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(backend.device)
    with backend.gathered(t.model):
        final["param_digest"] = check_replicas(t.model, backend, plan.end_step)
        weights = backend.state_dict(t.model)
    if job.main:
        _save_final(weights, job.run_dir / "model_final.pt")
    if job.main and plan.noise != "off":  # the throughput curve of the batch-size advice
        largest = speed.largest_micro(plan, job.cfg.max_micro_batch, plan.epoch_samples)
        sizes = speed.ladder(plan.micro_batch, largest)
        times = speed.time_micro_steps(t.model, backend, job.sources[0], sizes, t.dtype, t.loss_fn)
        sink.log({"step": plan.end_step, **times})
    return final


def finish(job: Job, result: dict[str, float], plan: BatchPlan) -> dict[str, Any]:
    """Rank 0 prints the final evaluation and the batch-size advice."""
    if job.main:
        accuracy = result.get("eval_accuracy")  # not for a loss of your own that is no classifier
        log.info(
            (f"test accuracy {accuracy:.4f} " if accuracy is not None else "test ")
            + f"({result['eval_samples']:,} samples), eval loss {result['eval_loss']:.4f}"
        )
        cfg = job.cfg
        print_advice(job.run_dir, plan, cfg.target_accuracy, cfg.optim, cfg.cluster)
    return {**result, "run_dir": str(job.run_dir)}


def _save_final(weights: dict[str, Any], path: Path) -> None:
    """model_final.pt, or WriteFailed (one line) with no partial file left."""
    try:
        with open(path, "wb") as f:
            torch_save(weights, f)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise WriteFailed("the final weights", path, exc) from None
