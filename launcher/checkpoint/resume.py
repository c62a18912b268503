"""What a checkpoint holds, and how a run continues from one: exactly, or at a new world size.

A checkpoint is world-size free: float32 weights and the optimizer state whole (as the plain
module's torch optimizer would hold them), the consumed-sample count (the data order and the LR
schedule are functions of it), the plan and config it was trained with, the memory profile and
every rank's RNG states. Resuming re-plans micro-batch and accumulation for the same global batch
on whatever is launched now; the sampler continues the sample stream at `consumed_samples`.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from launcher.checkpoint import files as checkpoint
from launcher.config.capabilities import capabilities
from launcher.config.optimization import RampConfig, ScheduleConfig
from launcher.config.schema import ConcreteConfig, RunConfig, to_dict
from launcher.errors import ConfigError
from launcher.planning.plan import batch_key
from launcher.planning.tokens import TWINS, tokens_per_sample
from launcher.types.plan import AdaptiveStage, BatchPlan
from launcher.types.state import CheckpointState, Progress, RngState, SavedConfig, SavedPlan

FORMAT = 1


def rng_state() -> RngState:
    """This process's RNG states, as data `torch.load(weights_only=True)` accepts."""
    numpy_state = np.random.get_state(legacy=True)
    assert isinstance(numpy_state, tuple)  # the global generator is MT19937: the legacy tuple
    kind, keys, pos, has_gauss, cached = numpy_state
    state: RngState = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: RngState) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def capture(
    cfg: RunConfig,
    plan: BatchPlan,
    step: int,
    backend: Any,
    model: Any,
    optimizer: Any,
    progress: Progress | None = None,
    whole: bool = True,
) -> CheckpointState | None:
    """The checkpoint of the state after optimizer step `step` (collective; rank 0 gets it).
    `progress`: what the run measured so far (training seconds, the noise-scale averages).
    `whole=False`: the ranks wrote their shards of weights and optimizer state already."""
    rngs = backend.gather_objects(rng_state())
    weights: dict[str, Any] = {}
    opt_state: dict[str, Any] = {}
    if whole:
        with backend.gathered(model):
            weights = backend.state_dict(model)
        opt_state = backend.optimizer_state(model, optimizer)
    if backend.rank != 0:
        return None
    return {
        "format": FORMAT,
        "step": step,
        "consumed_samples": plan.samples_at(step),
        "global_batch": plan.global_batch,
        "world_size": plan.world_size,
        "model": weights,
        "optimizer": opt_state,
        "rng": rngs,
        "plan": cast(SavedPlan, dataclasses.asdict(plan)),  # every field: SavedPlan names some
        "config": cast(SavedConfig, to_dict(cfg)),
        "progress": progress or {},
    }


KINDS = {int: "an integer", str: "a string", dict: "a mapping", list: "a list"}
# what a checkpoint must hold, and of which type, for a run to continue from it: the required
# keys of launcher/types/state.py CheckpointState (but `format`), SavedPlan and SavedConfig
HOLDS = {
    "step": int,
    "consumed_samples": int,
    "global_batch": int,
    "world_size": int,
    "model": dict,
    "optimizer": dict,
    "rng": list,
    "plan": dict,
    "config": dict,
    "progress": dict,
}
PLAN_HOLDS = {
    "origin_step": int,
    "origin_samples": int,
    "optimizer": str,
    "epoch_samples": int,
    "total_samples": int,
}
CONFIG_HOLDS = {
    "model": dict,
    "data": dict,
    "optim": dict,
    "schedule": dict,
    "seed": int,
    "trainer": dict,
    "checkpoint": dict,
}


def check_state(state: object) -> None:
    """ValueError unless `state` has the shape of a launcher checkpoint (a forged or foreign file
    whose digest matches is refused here, not by a traceback later)."""
    if not isinstance(state, dict) or "consumed_samples" not in state:
        raise ValueError("it is not a launcher checkpoint")
    parts = [("", state, HOLDS), ("plan.", state.get("plan"), PLAN_HOLDS)]
    parts.append(("config.", state.get("config"), CONFIG_HOLDS))
    for prefix, part, holds in parts:
        for key, kind in holds.items():
            value = part.get(key) if isinstance(part, dict) else None
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(
                    f"it is not a launcher checkpoint: {prefix}{key} is not {KINDS[kind]}"
                )
    counts = [state[k] for k in ("step", "consumed_samples", "global_batch")]
    if min(counts) < 0 or min(state["plan"][k] for k in PLAN_HOLDS if k != "optimizer") < 0:
        raise ValueError("it is not a launcher checkpoint: a negative count")
    if len(state["rng"]) != state["world_size"] or state["world_size"] < 1:
        raise ValueError("it is not a launcher checkpoint: one RNG state per rank expected")
    shards = state.get("shards")
    if shards is not None and not (
        isinstance(shards, dict)
        and all(
            isinstance(name, str)
            and checkpoint.PLAIN_NAME.fullmatch(name)
            and isinstance(entry, list)
            and len(entry) == 2
            for name, entry in shards.items()
        )
    ):
        raise ValueError("it is not a launcher checkpoint: its shard manifest is malformed")


def find(
    resume: str, run_dir: Path, warn: Callable[[str], None]
) -> tuple[CheckpointState, Path] | None:
    """The checkpoint to continue from (resume=auto|never|PATH), or None to start fresh."""
    if resume == "never":
        return None
    source = run_dir if resume == "auto" else Path(resume).expanduser()
    try:
        found = checkpoint.load(source, warn, check_state)
    except checkpoint.Unusable as exc:
        raise ConfigError(f"resume={resume!r}: {exc}") from None
    if found is None and resume != "auto":
        raise ConfigError(f"resume={resume!r}: no usable checkpoint there")
    return found


# data keys that say how data is fetched and loaded, not what it is: free to change on resume
LOADING_KEYS = (
    "cache_dir",
    "workers",
    "prefetch_factor",
    "persistent_workers",
    "pin_memory",
    "download",
    "verify",
)


def check(cfg: ConcreteConfig, state: CheckpointState, path: Path) -> tuple[int, int]:
    """Refuse to continue a checkpoint with a config that would train something else; returns
    the plan's origin (step, samples) where the current global batch took over. `cfg` is the
    job's concrete config: a batch stated in tokens is its sequences, as everything it says."""
    if "shards" in state and not capabilities(cfg.backend).sharded_checkpoints:
        raise ConfigError(
            f"backend.name={cfg.backend.name!r}: {path} holds shards written by backend=fsdp "
            "(torch.distributed.checkpoint); resume it with backend=fsdp (on any number of "
            "ranks), whose model_final.pt any backend can load"
        )
    said = batch_key(cfg.global_batch, cfg.global_batch_tokens)
    was = f"global_batch={state['global_batch']}"
    if cfg.global_batch_tokens is not None:
        was = f"global_batch_tokens={state['global_batch'] * tokens_per_sample(cfg.data)}"
    origin = (state["plan"]["origin_step"], state["plan"]["origin_samples"])
    ramp_end = origin[0] if state["plan"].get("ramp") else 0
    if ramp_end:  # the same ramp-up (compared below): plan_batch makes the same stages again
        origin = (0, 0)
    adaptive = cfg.ramp.mode == "adaptive"  # its batch is the checkpoint's (adaptive_stage)
    if state["global_batch"] != cfg.global_batch and not adaptive:
        if not cfg.checkpoint.allow_global_batch_change:
            raise ConfigError(
                f"{said}: {path} was trained with global batch {state['global_batch']} "
                f"(consumed {state['consumed_samples']:,} samples); resume with {was}, or say "
                "checkpoint.allow_global_batch_change=true, or resume=never to start over"
            )
        if state["step"] < ramp_end:
            raise ConfigError(
                f"{said}: {path} is in its batch ramp-up (step {state['step']:,} of "
                f"{ramp_end:,}); resume with {was} and change it after the ramp-up"
            )
        origin = (state["step"], state["consumed_samples"])
    ours = to_dict(cfg)
    older = {"ramp": to_dict(RampConfig()), "loss": {"name": "cross_entropy"}}
    saved: dict[str, Any] = older | dict(state["config"])  # written before these keys existed
    for group, default in (("ramp", RampConfig()), ("schedule", ScheduleConfig())):
        saved[group] = to_dict(default) | saved[group]  # and before the keys in tokens
    for part in (ours, saved):  # where the data lives and how it is loaded may change
        part["data"] = {k: v for k, v in part["data"].items() if k not in LOADING_KEYS}
        for group, key, _ in TWINS:  # a key in tokens says its twin in samples (compared)
            part[group] = {k: v for k, v in part[group].items() if k != key}
    for key in ("model", "data", "loss", "optim", "schedule", "seed", "ramp"):
        if ours[key] != saved[key]:
            raise ConfigError(
                f"{key}: differs from the config {path} was trained with ({saved[key]!r}, now "
                f"{ours[key]!r}); "
                "resume with the same settings, or resume=never to start over"
            )
    return origin


def adaptive_stage(ramp: RampConfig, state: CheckpointState) -> AdaptiveStage | None:
    """An adaptive ramp's stage in the checkpoint (batch, origin, earlier stages), which the plan
    continues from; None for other runs."""
    if ramp.mode != "adaptive":
        return None
    p = state["plan"]
    grown = tuple((int(g[0]), int(g[1]), int(g[2])) for g in p.get("grown", ()))
    return AdaptiveStage(state["global_batch"], p["origin_step"], p["origin_samples"], grown)


def check_optimizer(state: CheckpointState, plan: BatchPlan, path: Path) -> None:
    """Refuse a global batch whose plan swaps the optimizer (optim.large_batch): the checkpoint's
    optimizer state is another optimizer's."""
    saved = state["plan"]["optimizer"]
    if saved != plan.optimizer:
        raise ConfigError(
            f"global_batch={plan.global_batch}: the plan trains it with {plan.optimizer} "
            f"({plan.reasons['optimizer']}), {path} holds {saved}'s optimizer state, which does "
            f"not carry over; choose a global batch that keeps {saved}, or resume=never"
        )


def restore(state: CheckpointState, path: Path, backend: Any, model: Any, optimizer: Any) -> str:
    """Load weights, optimizer state and (same world size) RNG states; returns what was done.
    A checkpoint whose contents do not fit this run (forged: its digest and shape checks passed)
    is one line; every rank reads the same file, so every rank raises alike."""
    try:
        if "shards" in state:
            folder = checkpoint.shards_of(path)
            backend.load_shards(model, optimizer, folder, list(state["shards"]))
        else:
            backend.load_state(model, optimizer, state["model"], state["optimizer"])
        if state["world_size"] == backend.world_size:
            set_rng_state(state["rng"][backend.rank])
            return "weights, optimizer state and every rank's RNG states restored"
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"resume: {path} does not fit this run's model and optimizer ({why}); resume=never "
            "starts over"
        ) from None
    torch.manual_seed(hash((state["config"]["seed"], state["step"], backend.rank)) % 2**63)
    return (
        f"weights and optimizer state restored; saved on {state['world_size']} rank(s), now "
        f"{backend.world_size}: RNG states reseeded from (seed, step, rank)"
    )
