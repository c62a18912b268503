"""The memory cap on micro_batch=auto: probe steps of the real model on the real device.

`measured_cap` runs at most three probe steps (two sizes to fit, one to verify the chosen size),
or none when a cached profile matches; every rank probes its own device and the cap is the minimum
over ranks (one collective). `estimated_cap` does the same with fake tensors for plan_only, and
caches its profile too: a plan_only sweep over batch sizes or clusters traces the model once, and a
cached estimate skips FakeTensorMode, whose first use imports torch._dynamo (~1.3 s).

(Over 400 lines on purpose: the measured cap, the estimate and their cache share the probe step,
the cache key and the out-of-memory lesson; split, each half would import the other.)
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import logging
import os
import platform
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from launcher import log
from launcher.backends.ds_config import reduce_bucket_elements
from launcher.config.capabilities import capabilities
from launcher.config.components import (
    CrossEntropyConfig,
    DataConfig,
    LossConfig,
    ModelConfig,
    UserModelConfig,
)
from launcher.config.execution import BackendConfig, DeepSpeedConfig, MemoryConfig
from launcher.config.optimizers import family_of
from launcher.config.schema import RunConfig, require_concrete, to_dict
from launcher.config.targets import locate
from launcher.data import DataSpec, data_spec, fake_batch
from launcher.data.batches import call
from launcher.errors import ConfigError
from launcher.memory.profile import (
    PROBE_SIZES,
    CudaMeter,
    MemoryProfile,
    StorageMeter,
    Trace,
    budget_bytes,
    fit_traces,
    free_bytes,
    human_bytes,
    is_oom,
    load_cached,
    save_cached,
)
from launcher.memory.sharding import model_bytes, sharding_credit
from launcher.models import build_model
from launcher.models.loss import LossMismatch, classifies, make_loss
from launcher.models.outputs import logits_of
from launcher.optim import build_optimizer
from launcher.planning.split import split_batch
from launcher.types.plan import BatchPlan
from launcher.types.provided import TARGET, source_of


def _step(cfg: RunConfig, spec: DataSpec, plan: BatchPlan, device: str, micro: int) -> None:
    """One training step of a fresh model in steady state, at `micro` samples.

    The model, its optimizer state (made by a step on zero gradients, as training has it from the
    second step on), the batch, forward, loss, backward and the step all run, with the run's dtype
    and autocast precision; everything is freed on return, and the caller's RNG state is untouched.
    For a sharding backend the step is a micro-step after the first of an accumulation: the zero
    gradients stay, held through forward and backward as earlier micro-steps' gradients are
    (launcher/memory/sharding.py credits the rest).
    """
    cuda = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=cuda):
        _seeded_step(cfg, spec, plan, device, micro)


def _seeded_step(cfg: RunConfig, spec: DataSpec, plan: BatchPlan, device: str, micro: int) -> None:
    require_concrete(cfg.backend, cfg.trainer)
    held = _holds_gradients(cfg.backend)
    dtype = getattr(torch, cfg.trainer.dtype)
    precision = cfg.backend.mixed_precision
    half = torch.bfloat16 if precision == "bf16" else torch.float16
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in place: fake tensors cannot be moved or cast by .to()
    try:
        with torch.device(device):
            model = build_model(cfg.model, spec)
    finally:
        torch.set_default_dtype(default)
    opt = build_optimizer(plan.optimizer, cfg.optim, model, plan.lr, plan.weight_decay)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    if not held:
        opt.zero_grad(set_to_none=True)
    x, y = fake_batch(spec, micro, device, dtype)
    loss_fn = make_loss(cfg.loss, cfg.trainer.label_smoothing)
    with torch.autocast(device.split(":")[0], dtype=half, enabled=precision != "no"):
        try:
            outputs = logits_of(call(model, x))
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            if is_oom(exc) or _fake_limit(exc):  # the device's limit, not the model's error
                raise
            raise ConfigError(
                f"{_names(cfg.model, cfg.data)}: {_first_line(exc)} {_inputs(x)}"
            ) from exc
        _check_classes(_names(cfg.model, cfg.data), spec, outputs, y)
        try:
            loss = loss_fn.checked_sum(outputs, y) / micro
        except LossMismatch as exc:
            raise ConfigError(f"{_names(cfg.model, cfg.data)}: {exc}") from exc.__cause__
    del outputs  # as in the loop's micro-step, which keeps no reference to them in backward
    loss.backward()  # type: ignore[no-untyped-call]
    opt.step()
    opt.zero_grad(set_to_none=True)


def _check_classes(names: str, spec: DataSpec, outputs: Any, y: torch.Tensor) -> None:
    """Class scores for every class the data has: its declared classes (num_classes; a text's
    vocabulary) and the largest target the launcher has read (your data's first samples), against
    the outputs' last dimension (known on fake tensors too: plan_only checks it). A target without
    a score would end the run in an IndexError (on a GPU, a device-side assert)."""
    if not classifies(outputs, y):
        return
    scores, need, source = outputs.shape[-1], 0, ""
    if spec.num_classes is not None:
        need, source = spec.num_classes, f"it declares {spec.num_classes} classes"
    if spec.top_target is not None and spec.top_target + 1 > need:
        need, source = spec.top_target + 1, f"a target of {spec.top_target} in its first samples"
    if need > scores:
        raise ConfigError(
            f"{names}: the model gives {scores} class scores per sample, but "
            f"the data has at least {need} classes ({source}); give the model's output layer "
            f"{need} or more outputs (a model of your own: its class-count argument)"
        )


def _holds_gradients(backend: BackendConfig) -> bool:
    """Whether the probe's step holds earlier micro-steps' gradients (a sharding backend)."""
    return capabilities(backend).sharding is not None


def gives_accuracy(model_cfg: ModelConfig, data: DataConfig, loss: LossConfig) -> bool:
    """Whether the run's evaluation reports accuracy: the built-in cross-entropy always does;
    your loss where the model's outputs are class scores of integer targets, which one forward
    of two samples on fake tensors shows (nothing is allocated; a model fake tensors cannot run
    counts as giving it: the run then says so when it evaluates)."""
    if isinstance(loss, CrossEntropyConfig):
        return True
    spec = data_spec(data)
    try:
        with fake_mode(), torch.device("cpu"):
            model = build_model(model_cfg, spec)
            x, y = fake_batch(spec, 2, "cpu", torch.get_default_dtype())
            return classifies(logits_of(call(model, x)), y)
    except (RuntimeError, ValueError, TypeError, IndexError):
        return True


def _names(model: ModelConfig, data: DataConfig) -> str:
    """model and data as the user chose them, for messages."""

    def name(group: str, c: Any) -> str:
        target = getattr(c, "target", None)
        if target is None:
            return f"{group}={c.name!r}"
        if "described" in c.kwargs:  # handed to launcher.run()
            return f"{group} {c.kwargs['described']} (launcher.run)"
        return f"{group}._target_={target!r}"

    return f"{name('model', model)} with {name('data', data)}"


def _inputs(x: Any) -> str:
    if isinstance(x, dict):
        return (
            "(on inputs " + ", ".join(f"{k} {tuple(v.shape)} {v.dtype}" for k, v in x.items()) + ")"
        )
    return f"(on inputs {tuple(x.shape)} {x.dtype})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _fake_limit(exc: BaseException) -> bool:
    """An error of the fake-tensor machinery (an op it cannot run), not of the model on the data."""
    return type(exc).__module__.startswith("torch._subclasses") or "FakeTensor" in str(exc)


def check_fit(cfg: RunConfig, spec: DataSpec, plan: BatchPlan, device: str) -> None:
    """One step of two samples of a fresh model (fake tensors for plan_only): the model takes the
    data's inputs and its outputs fit the loss, or ConfigError in one line. The memory probe's
    steps check the same; this is for runs that do not probe. Under plan_only a cached estimate
    of the same model, loss and data (memory.cache=use) has checked it: fake tensors, which
    import torch._dynamo (~1 s), are not started again."""
    if not cfg.plan_only:
        _step(cfg, spec, plan, device, 2)
        return
    if _cached(cfg.memory, _cache_key(cfg, spec, plan, FAKE))[0] is not None:
        return  # a cached estimate of the same model, loss and data: its fake steps checked it
    try:
        with fake_mode():
            _step(cfg, spec, plan, "cpu", 2)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        if not _fake_limit(exc):
            raise
        names = _names(cfg.model, cfg.data)
        log.warn(  # not skipped silently: a real run checks it with real tensors before training
            f"launcher: note: plan_only could not check that {names} fit together with "
            f"fake tensors ({_first_line(exc)}); a real run checks it before training"
        )


@contextmanager
def fake_mode() -> Iterator[None]:
    """Fake tensors for the plan_only estimate and check (no memory used); your data's real first
    sample is converted on use. torch's fake-tensor logger, which would print an op's failure
    as several lines before the error itself arrives, is quiet meanwhile."""
    from torch._subclasses.fake_tensor import FakeTensorMode  # imports torch._dynamo

    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield
    finally:
        logger.setLevel(level)


def probe_trace(cfg: RunConfig, spec: DataSpec, plan: BatchPlan, device: str, micro: int) -> Trace:
    """Live tensor bytes after every op of one probe step, and the ops."""
    with StorageMeter() as meter:
        _step(cfg, spec, plan, device, micro)
    return meter.trace, meter.ops


def probe_peak(cfg: RunConfig, spec: DataSpec, plan: BatchPlan, device: str, micro: int) -> int:
    """The step's peak as the device sees it: the CUDA allocator's, or counted tensor bytes."""
    with CudaMeter() if device.startswith("cuda") else StorageMeter() as meter:
        _step(cfg, spec, plan, device, micro)
    return meter.peak()


def param_bytes(model_cfg: ModelConfig, dtype_name: str, spec: DataSpec, plan: BatchPlan) -> int:
    """Bytes of the model's parameters, counted on the meta device (nothing allocated)."""
    dtype = getattr(torch, dtype_name)
    with torch.device("meta"):
        model = build_model(model_cfg, spec, fresh=False)  # counted, never run
    return sum(p.numel() * dtype.itemsize for p in model.parameters())


def check_model_fits(
    cfg: RunConfig, spec: DataSpec, plan: BatchPlan, device: str, local: int
) -> None:
    """Before the model is built: refuse in one line a model that cannot train even at
    micro-batch 1, from what it must hold whatever the batch, counted on the meta device: every
    rank builds its weights whole in host memory, and training holds weights, gradients and the
    optimizer's state (split over the ranks at best, as full sharding does) on the device. A
    model the meta device cannot build is checked by its building instead."""
    try:
        weights = param_bytes(cfg.model, cfg.trainer.dtype, spec, plan)
    except Exception:  # noqa: BLE001 - e.g. a factory that reads files: built for real then
        return
    states = family_of(plan.optimizer).state_tensors(cfg.optim.momentum)
    held = weights * (2 + states) // plan.world_size
    what = "weights, gradients" + (f" and {plan.optimizer}'s state" if states else "")
    if plan.world_size > 1:
        what += f" split over {plan.world_size} ranks, the weights whole while built"
    checks = [(max(held, weights), device, what)]
    if device != "cpu":
        checks.append((weights, "cpu", "the weights, built whole on each rank's host"))
    for need, where, words in checks:
        budget, why = budget_bytes(cfg.memory, free_bytes(where, local))
        if need > budget:
            raise ConfigError(
                f"memory: {_names(cfg.model, cfg.data)} does not fit even at micro-batch 1: it "
                f"needs at least {human_bytes(need)} on {where} ({words}), more than the budget "
                f"of {why}; use a smaller model or a machine with more memory"
            )


FAKE = "fake"  # the estimate's "device": fake tensors, the same profile for every declared device


def _cache_key(cfg: RunConfig, spec: DataSpec, plan: BatchPlan, device: str) -> dict[str, Any]:
    if device == FAKE:
        device_id = "fake tensors (plan_only estimate)"
    elif device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        device_id = f"{props.name}, {props.total_memory} B"
    else:
        device_id = f"cpu {platform.machine()}"
    return {
        "model": to_dict(cfg.model),
        "code": _code_version(cfg.model),
        "loss": to_dict(cfg.loss),
        "data": spec.describe(),
        "input_shape": list(spec.input_shape),
        "num_classes": spec.num_classes,
        "tokens": spec.tokens,
        "dtype": cfg.trainer.dtype,
        "precision": cfg.backend.mixed_precision,
        "backend": cfg.backend.name,
        "optimizer": plan.optimizer,
        "device": device_id,
        "torch": torch.__version__,
        "probe_sizes": list(PROBE_SIZES),
        "profile": 2,  # backend overheads (DDP/ZeRO buckets, sharding) are added on load
        **({"held_gradients": True} if _holds_gradients(cfg.backend) else {}),
    }


def _code_version(model: ModelConfig) -> str:
    """For your model: the size and modification time of the file that defines its factory (a
    changed model is measured again); built-in models change with the launcher's version."""
    if not isinstance(model, UserModelConfig):
        return ""
    try:
        if model.target == TARGET:  # launcher.run(model=...): the object's own code
            path = inspect.getsourcefile(source_of("model"))
        else:
            path = inspect.getsourcefile(inspect.unwrap(locate(model.target, "model")))
        stat = os.stat(path) if path else None
    except (TypeError, OSError):
        return "unknown"
    return f"{path} {stat.st_size} {stat.st_mtime_ns}" if stat else "unknown"


def _auto_micro(plan: BatchPlan, max_micro: int, cap: int) -> int:
    return split_batch(plan.global_batch, plan.world_size, "auto", max_micro, cap)[0]


def _first_traces(
    cfg: RunConfig, spec: DataSpec, plan: BatchPlan, device: str
) -> list[tuple[int, Trace]]:
    """Traces at the probe sizes, or at 1 and 2 samples when those do not fit the device."""
    for sizes in (PROBE_SIZES, (1, 2)):
        try:
            return [(n, probe_trace(cfg, spec, plan, device, n)) for n in sizes]
        except RuntimeError as exc:  # torch.OutOfMemoryError is one
            if not is_oom(exc):
                raise
            gc.collect()
            torch.cuda.empty_cache()
    raise ConfigError(
        f"memory: a training step of 2 samples does not fit on {device}; use a device with more "
        "memory, mixed precision (backend.mixed_precision=bf16), or a smaller model"
    )


def measured_cap(
    cfg: RunConfig,
    spec: DataSpec,
    plan: BatchPlan,
    device: str,
    local_processes: int,
    all_min: Callable[[int], int],
) -> tuple[int, dict[str, Any]]:
    """(cap, what the plan reports) from this device's profile, minimum over all ranks."""
    budget, budget_why = budget_bytes(cfg.memory, free_bytes(device, local_processes))
    key = _cache_key(cfg, spec, plan, device)
    profile, note = _cached(cfg.memory, key)
    steps = 0
    if profile is None:
        (n1, trace1), (n2, trace2) = _first_traces(cfg, spec, plan, device)
        profile, steps = fit_traces(n1, trace1, n2, trace2, "measured"), 2
        if profile.max_micro(budget) >= 1:  # verify the size the plan will pick, with a real step
            micro = _auto_micro(plan, cfg.max_micro_batch, profile.max_micro(budget))
            predicted = profile.peak(micro)
            try:
                observed = probe_peak(cfg, spec, plan, device, micro)
            except RuntimeError as exc:  # torch.OutOfMemoryError is one
                if not is_oom(exc):
                    raise
                observed = budget + 1  # what matters: it did not fit
            steps += 1
            note += (
                f"; verify step at {micro}: {human_bytes(observed)}, predicted "
                f"{human_bytes(predicted)}"
            )
            profile = dataclasses.replace(
                profile,
                overhead_bytes=max(observed - predicted, 0),  # what the tensor count missed
                points=(*profile.points, (micro, observed)),
            )
        note = f"{note}; {_save(cfg.memory, key, profile)}"
    profile, note, said = _with_backend_overhead(cfg, spec, plan, profile, note)
    cap = all_min(profile.max_micro(budget))
    if cap < 1:
        raise ConfigError(
            f"memory: one sample needs {human_bytes(profile.peak(1))} ({profile.describe()}) "
            f"but the budget on at least one rank is smaller (here: {budget_why}); raise "
            "memory.budget_gb, lower memory.margin_gb, or use a device with more memory"
        )
    return cap, _report(profile, budget, budget_why, cap, steps, note, said)


def backend_overhead(cfg: RunConfig, spec: DataSpec, plan: BatchPlan) -> tuple[int, str]:
    """Bytes the backend holds beyond one plain training step (negative: less, a sharding
    backend's credit), and what they are."""
    b = cfg.backend
    sharding = capabilities(b).sharding
    if sharding is not None:
        counts = model_bytes(cfg.model, cfg.trainer.dtype, spec, plan, cfg.optim)
        credit = sharding_credit(counts, plan.world_size, sharding, plan.oom_recovery)
        return -credit.bytes, credit.text
    if capabilities(b).zero_buckets:
        assert isinstance(b, DeepSpeedConfig)  # only DeepSpeed has ZeRO's buckets
        bucket = reduce_bucket_elements(b)
        itemsize = 2 if b.mixed_precision != "no" and not b.autocast else 4
        extra = 2 * bucket * itemsize  # measured on an H100: two buckets' worth (bench/README.md)
        return extra, f"ZeRO-{b.zero_stage} gradient buckets {human_bytes(extra)}"
    if plan.world_size > 1:  # DDP (and ZeRO 0) keep a flat gradient bucket copy of the parameters
        extra = param_bytes(cfg.model, cfg.trainer.dtype, spec, plan)
        return extra, f"gradient all-reduce buckets {human_bytes(extra)}"
    return 0, ""


def _with_backend_overhead(
    cfg: RunConfig, spec: DataSpec, plan: BatchPlan, profile: MemoryProfile, note: str
) -> tuple[MemoryProfile, str, str]:
    """(profile, note, what the plan's memory row says of it) with the backend's bytes."""
    extra, why = backend_overhead(cfg, spec, plan)
    if not extra:
        return profile, note, ""
    profile = dataclasses.replace(profile, overhead_bytes=profile.overhead_bytes + extra)
    if _holds_gradients(cfg.backend):  # sharding: in the plan's memory row too
        return profile, f"{note}; {why}", f"; {why}"
    return profile, f"{note}; + {why}", ""


def estimated_cap(
    cfg: RunConfig, spec: DataSpec, plan: BatchPlan, device_memory_bytes: int
) -> tuple[int, dict[str, Any]]:
    """(cap, report) for a device this process does not have: fake tensors, no memory used."""

    def fake_trace(n: int) -> Trace:
        with fake_mode():
            try:
                return probe_trace(cfg, spec, plan, "cpu", n)
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                if not _fake_limit(exc):
                    raise
                names = _names(cfg.model, cfg.data)
                raise ConfigError(
                    f"plan_only: the memory estimate cannot trace {names} with fake "
                    f"tensors ({_first_line(exc)}); plan without it: micro_batch=N or "
                    "memory.probe=false"
                ) from exc

    key = _cache_key(cfg, spec, plan, FAKE)
    profile, cached = _cached(cfg.memory, key)
    note = "fake tensors: tensor storage counted; no allocator rounding, workspaces or CUDA context"
    if profile is None:
        n1, n2 = PROBE_SIZES
        profile = fit_traces(n1, fake_trace(n1), n2, fake_trace(n2), "estimated")
        try:
            note = f"{note}; {cached}; {_save(cfg.memory, key, profile)}"
        except OSError as exc:  # plan_only needs no cache: say so, plan anyway
            note = f"{note}; {cached}; not cached ({exc})"
    else:
        profile = dataclasses.replace(profile, source="estimated")
        note = f"{note}; from {cached}"
    profile, note, said = _with_backend_overhead(cfg, spec, plan, profile, note)
    budget, budget_why = budget_bytes(cfg.memory, device_memory_bytes)
    cap = profile.max_micro(budget)
    if cap < 1:
        raise ConfigError(
            f"memory: one sample needs an estimated {human_bytes(profile.peak(1))} "
            f"({profile.describe()}) but the budget is {budget_why}"
        )
    return cap, _report(profile, budget, budget_why, cap, 0, note, said)


def _cached(memory: MemoryConfig, key: dict[str, Any]) -> tuple[MemoryProfile | None, str]:
    """The cache entry under memory.cache=use; none (measure again) under refresh and off."""
    if memory.cache != "use":
        return None, f"memory.cache={memory.cache}: not read"
    return load_cached(memory.cache_dir, key)


def _save(memory: MemoryConfig, key: dict[str, Any], profile: MemoryProfile) -> str:
    if memory.cache == "off":
        return "not saved (memory.cache=off)"
    return f"saved to {save_cached(memory.cache_dir, key, profile)}"


def _ceiling_note(profile: MemoryProfile, budget: int) -> str:
    """What an earlier out-of-memory error does to this cap, for the plan's memory row."""
    ceiling, cap = profile.ceiling(budget), profile.line_cap(budget)
    if ceiling is None or cap < 1 or ceiling >= cap:
        return ""
    return (
        f" (capped at {ceiling:,}; the measured lines allow {cap:,}: {ceiling + 1:,} samples ran "
        "out of memory in an earlier run with no more room; memory.cache=refresh forgets it)"
    )


MAX_CEILINGS = 8  # out-of-memory records kept per cache entry (the newest)


def record_oom(
    cfg: RunConfig,
    spec: DataSpec,
    plan: BatchPlan,
    device: str,
    report: dict[str, Any],
    micro: int,
) -> None:
    """Keep in the cached profile that `micro` ran out of memory under this budget: a ceiling
    for runs with no more room, beside the measured lines, which stay as measured (one event on
    one device at one moment says nothing about the model's bytes per sample)."""
    if cfg.memory.cache == "off" or micro < 2:  # at 1 sample the run stops: nothing to lower
        return
    key = _cache_key(cfg, spec, plan, device)
    lines = tuple(tuple(line) for line in report["lines"])
    extra = backend_overhead(cfg, spec, plan)[0]  # added on load, so not stored
    points = tuple(map(tuple, report["points"]))
    stored, _ = load_cached(cfg.memory.cache_dir, key)  # earlier events of this run too
    known = stored.ceilings if stored is not None else map(tuple, report.get("ceilings", ()))
    ceilings = (*known, (report["budget_bytes"], micro))
    profile = MemoryProfile(
        lines, report["overhead_bytes"] - extra, points, "", ceilings[-MAX_CEILINGS:]
    )
    save_cached(cfg.memory.cache_dir, key, profile)


def _report(
    profile: MemoryProfile,
    budget: int,
    budget_why: str,
    cap: int,
    steps: int,
    note: str,
    said: str = "",
) -> dict[str, Any]:
    return dataclasses.asdict(profile) | {
        "lines": [list(line) for line in profile.lines],
        "points": [list(p) for p in profile.points],
        "budget_bytes": budget,
        "cap": cap,
        "probe_steps": steps,
        "reason": f"{profile.describe()}{said}; budget {budget_why}; fits {cap:,} samples"
        + _ceiling_note(profile, budget),
        "note": note,
    }
