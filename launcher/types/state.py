"""The checkpoint state: what launcher/checkpoint/resume.py `capture` builds, what
checkpoint/files.py writes and loads, and what resume, the job's phases and `python -m
launcher.cbs` read.

TypedDicts, not classes: a checkpoint is read back with `torch.load(weights_only=True)`, which
builds nothing but tensors and plain containers, and the file holds the same plain dicts as
before these types existed (a checkpoint written by an older launcher loads as it is).
No `from __future__ import annotations`: TypedDict tells NotRequired keys by their evaluated
annotations (tests/test_checkpoint_files.py holds check_state to the required ones).
checkpoint/resume.py `check_state` holds a loaded file to this shape before any of it is read.
"""

from typing import TYPE_CHECKING, Any, NotRequired, TypedDict

if TYPE_CHECKING:
    from torch import Tensor


class RngState(TypedDict):
    """One rank's random number generators."""

    python: tuple[int, tuple[int, ...], float | None]  # random.getstate()
    # numpy's get_state() as a list (kind, keys as a list, pos, has_gauss, cached): no ndarray,
    # which weights_only does not load; a list of mixed kinds, so its items are Any
    numpy: list[Any]
    torch: "Tensor"  # torch.get_rng_state()
    cuda: NotRequired["Tensor"]  # torch.cuda.get_rng_state(), where CUDA is available


class StreamPlace(TypedDict):
    """A stream's saved place (launcher/data/stream.py Reader.snapshot): the global position, the
    stream's own state there and the digest of the sample at it."""

    position: int
    state: Any  # the user's stream's state_dict(), whatever it holds (plain data), or None
    digest: int


class NoiseState(TypedDict):
    """The noise-scale estimate's running state (launcher/batchsize/meter.py NoiseMeter)."""

    ema: dict[str, float]  # gradient_sq, trace, weight (launcher/batchsize/noise.py)
    skipped: int  # measurements left out (not finite)
    at: int | None  # the samples of the last measurement (None: none yet)


class Progress(TypedDict, total=False):
    """What the run measured up to the checkpoint; a key is absent when it was not measured."""

    train_s: float  # training seconds (saving, evaluating and waiting not counted)
    noise: NoiseState  # the noise-scale estimate (plan.noise != off)
    loss_start: float  # the loss divergence is measured against (launcher/training/guard.py)
    stream: StreamPlace  # the stream's place at the checkpoint (streamed data)


class SavedPlan(TypedDict):
    """The plan the checkpoint was trained with: dataclasses.asdict(BatchPlan), every field of
    it; these are the ones read back (check_state holds the required ones)."""

    optimizer: str
    epoch_samples: int
    total_samples: int
    origin_step: int  # where the current global batch took over
    origin_samples: int
    ramp: NotRequired[tuple["SavedPlan", ...]]  # the ramp-up's stages (absent in older ones)
    grown: NotRequired[tuple[tuple[int, int, int], ...]]  # adaptive: (step, samples, batch)


class SavedConfig(TypedDict):
    """The run's config as config/schema.py `to_dict` writes it, one mapping per group. A group
    is plain data whose keys and values are the group's, and a user's nodes (a factory's own
    keyword arguments) hold whatever the user gave: the groups are typed as such, and resume
    compares them key by key."""

    model: dict[str, Any]
    data: dict[str, Any]
    optim: dict[str, Any]
    schedule: dict[str, Any]
    seed: int
    trainer: dict[str, Any]
    checkpoint: dict[str, Any]
    ramp: NotRequired[dict[str, Any]]  # absent in checkpoints written before ramp.* existed
    loss: NotRequired[dict[str, Any]]  # and before loss.* existed


class CheckpointState(TypedDict):
    """A checkpoint: the state after optimizer step `step`, world-size free."""

    format: int  # checkpoint/resume.py FORMAT
    step: int
    consumed_samples: int
    global_batch: int
    world_size: int  # the ranks that wrote it (one RNG state each)
    model: dict[str, "Tensor"]  # float32 weights of the plain module; {} when in shards
    # the optimizer state in torch's Optimizer.state_dict() form over the plain module's
    # parameters ({"state": ..., "param_groups": ...}); what it holds is the optimizer's own;
    # {} when in shards
    optimizer: dict[str, Any]
    rng: list[RngState]  # by rank
    plan: SavedPlan
    config: SavedConfig
    progress: Progress
    shards: NotRequired[dict[str, list[int | str]]]  # backend=fsdp: {file: [bytes, SHA-256]}
