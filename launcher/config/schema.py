"""RunConfig: the typed, validated, frozen form of the composed Hydra config.

Hydra composes a plain dict (see `compose.py`); `to_run_config` turns it into these dataclasses and
raises `ConfigError` naming the key, the value and what is allowed. No torch import here. The
groups' dataclasses live by what they configure: components.py (model, data, loss),
optimization.py (optim, schedule, ramp), execution.py (backend, trainer, memory, checkpoint),
placement.py (cluster, slurm); checks.py holds what they share.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, NewType, Union

from launcher.config.checks import (
    TARGET_KEY,
    TARGET_PATH,
    Target,
    check_seed,
    fail,
    own_options,
    require,
)
from launcher.config.components import CrossEntropyConfig, DataConfig, LossConfig, ModelConfig
from launcher.config.execution import BackendConfig, CheckpointConfig, MemoryConfig, TrainerConfig
from launcher.config.optimization import OptimConfig, RampConfig, ScheduleConfig
from launcher.config.placement import ClusterConfig, SlurmConfig
from launcher.config.ranges import maximum
from launcher.errors import ConfigError


# ---------------------------------------------------------------------------------------- run
@dataclass(frozen=True, kw_only=True)
class RunConfig:
    recipe: str
    """recipe that was composed (+recipe=NAME)"""
    global_batch: int = 256
    """samples per optimizer step, over all devices and accumulation steps"""
    global_batch_tokens: int | None = None
    """the global batch in tokens, for sequence data (data.seq_len tokens per sample): replaces
    global_batch by global_batch_tokens / data.seq_len sequences, which must be whole and split
    over the devices (launcher/planning/tokens.py); null = global_batch says it"""
    micro_batch: int | Literal["auto"] = "auto"
    """samples per device per forward/backward; auto = largest divisor under the caps"""
    max_micro_batch: int = 1024
    """upper bound for an automatic micro-batch"""
    seed: int = 0
    """seed of model init and shuffling"""
    plan_only: bool = False
    """print and save the plan, then exit without training"""
    run_dir: str | None = None
    """output directory; default outputs/<recipe>/<timestamp>"""
    model: ModelConfig
    """model group"""
    data: DataConfig
    """data group"""
    optim: OptimConfig
    """optim group"""
    schedule: ScheduleConfig
    """schedule group"""
    backend: BackendConfig
    """backend group"""
    trainer: TrainerConfig
    """trainer group"""
    cluster: ClusterConfig
    """cluster group"""
    loss: LossConfig = dataclasses.field(
        default_factory=lambda: CrossEntropyConfig(name="cross_entropy")
    )
    """loss group: the training loss (cross_entropy, or your own with loss._target_)"""
    memory: MemoryConfig = dataclasses.field(default_factory=MemoryConfig)
    """memory probing and budget"""
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    """when checkpoints are written and how many are kept"""
    ramp: RampConfig = dataclasses.field(default_factory=RampConfig)
    """batch ramp-up: the global batch doubles from ramp.start_batch to global_batch"""
    slurm: SlurmConfig = dataclasses.field(default_factory=SlurmConfig)
    """sbatch settings for `python -m launcher.slurm` (node/task/GPU counts come from cluster)"""
    resume: str = "auto"
    """auto: continue from the newest valid checkpoint in run_dir; never; or a checkpoint file or
    run directory to start from"""
    target_accuracy: float | None = None
    """the eval accuracy a run should reach: the plan checks that trainer.epochs suffice at this
    global batch, from an earlier run's noise scale (launcher/batchsize/prior.py); null = the
    earlier run's own final result"""
    objective: Literal["eval_accuracy", "eval_loss", "samples_to_target"] = "eval_accuracy"
    """what each job returns to a Hydra sweeper (launcher/training/objective.py): the final eval
    accuracy (maximize), the final eval loss, or the samples to target_accuracy (minimize)"""

    def __post_init__(self) -> None:
        require(self.global_batch > 0, "global_batch", self.global_batch, "must be > 0")
        tokens = self.global_batch_tokens
        require(tokens is None or tokens > 0, "global_batch_tokens", tokens, "must be > 0 or null")
        check_seed("seed", self.seed)
        ok = self.run_dir is None or bool(self.run_dir.strip())
        require(ok, "run_dir", self.run_dir, "empty; give a folder (or leave it out)")
        require(
            self.objective != "samples_to_target" or self.target_accuracy is not None,
            "objective",
            self.objective,
            "needs target_accuracy (the eval accuracy whose samples it counts)",
        )
        require(
            self.micro_batch == "auto" or self.micro_batch > 0,
            "micro_batch",
            self.micro_batch,
            "must be auto or a positive integer",
        )
        require(self.max_micro_batch > 0, "max_micro_batch", self.max_micro_batch, "must be > 0")
        require(
            self.target_accuracy is None or 0 < self.target_accuracy < 1,
            "target_accuracy",
            self.target_accuracy,
            "must be null or in (0, 1)",
        )
        require(
            self.trainer.label_smoothing == 0 or isinstance(self.loss, CrossEntropyConfig),
            "trainer.label_smoothing",
            self.trainer.label_smoothing,
            "applies to the built-in cross-entropy only; give your loss its own setting",
        )


def require_concrete(backend: BackendConfig, trainer: TrainerConfig) -> None:
    """Raise if a device-dependent `auto` is still unresolved (run.on_device resolves them): code
    that builds, probes or trains must never guess what `auto` means."""
    if backend.mixed_precision == "auto" or trainer.channels_last == "auto":
        raise RuntimeError(
            "backend.mixed_precision / trainer.channels_last are 'auto': resolve them for the "
            "device first (launcher.training.job.on_device)"
        )


# A RunConfig as a job trains with it: its device-dependent `auto`s resolved and its quantities
# stated in tokens converted into samples. Each process makes it once per job
# (launcher.training.job.concrete) and hands it down: the planner, resume and everything that
# records the config read it, and none converts it again.
ConcreteConfig = NewType("ConcreteConfig", RunConfig)


# ------------------------------------------------------------------------------- dict -> dataclass
def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against the type `hint`; return it converted (lists -> tuples)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if all(dataclasses.is_dataclass(o) for o in options):
            return _build_named(options, value, key)
        for option in options:
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
        fail(key, value, f"must be {describe(hint)}")
    if origin is Literal:
        require(value in typing.get_args(hint), key, value, f"must be {describe(hint)}")
        return value
    if origin is tuple:
        require(isinstance(value, (list, tuple)), key, value, f"must be {describe(hint)}")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        require(len(value) == len(args), key, value, f"must be {describe(hint)}")
        return tuple(
            _coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if hint is type(None):
        require(value is None, key, value, "must be null")
        return None
    if hint in (bool, int, float) and isinstance(value, str):
        value = _from_string(value, hint)
    if hint is bool:
        require(isinstance(value, bool), key, value, "must be true or false")
        return value
    if hint is int:
        require(
            isinstance(value, int) and not isinstance(value, bool), key, value, "must be an integer"
        )
        return value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        require(ok, key, value, "must be a number")
        require(_finite(value), key, value, "must be a finite number")
        return float(value)
    if hint is str:
        require(isinstance(value, str), key, value, "must be a string")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")


def _finite(value: float) -> bool:
    """A finite number, and an integer within float's range (10**400 is not a float)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _within_maxima(obj: Any, prefix: str) -> None:
    """Every number of the built dataclass `obj` at most its key's maximum (config/ranges.py)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                top, what = maximum(prefix + f.name)
                shown = f"{top:,}" if isinstance(top, int) else f"{top:g}"
                require(v <= top, prefix + f.name, value, f"must be <= {shown} ({what})")


def _from_string(value: str, hint: type) -> Any:
    """A string given for a number or true/false key, converted as OmegaConf's typed nodes convert
    it ("3" for an int, "1e-3" for a float, "yes"/"no"/"true"/"false"/"1"/"0" for a bool): what
    an OmegaConf user expects of `${oc.env:EPOCHS,3}` or `'3'`. A string that does not convert
    comes back as it is, for the caller to refuse naming the key."""
    from omegaconf import BooleanNode, FloatNode, IntegerNode
    from omegaconf.errors import ValidationError

    try:
        if hint is bool:
            return BooleanNode(value)._value()
        return IntegerNode(value)._value() if hint is int else FloatNode(value)._value()
    except ValidationError:
        return value


def describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(hint))
    if origin is tuple:
        return "a list"
    if hint is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def _build(cls: type, node: Any, key: str) -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys and missing required ones."""
    prefix = f"{key}." if key else ""
    if not isinstance(node, dict):
        fail(key, node, "must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(node) - set(fields))
    if unknown:
        fail(prefix + unknown[0], node[unknown[0]], f"unknown key; allowed: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, field in fields.items():
        if name not in node:
            if (
                field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING
            ):
                raise ConfigError(f"{prefix}{name} is required but not set")
            continue
        kwargs[name] = _coerce(prefix + name, node[name], hints[name])
    built = cls(**kwargs)
    _within_maxima(built, prefix)
    return built


def _build_named(options: tuple[type, ...], node: Any, key: str) -> Any:
    """Build the dataclass of a union that `node['name']` selects (model, data, loss), or the
    union's user component when the node has a `_target_`."""
    targets = [c for c in options if issubclass(c, Target)]
    if isinstance(node, dict) and TARGET_KEY in node and targets:
        return _build_target(targets[0], node, key)
    named = [c for c in options if c not in targets]
    by_name = {typing.get_args(typing.get_type_hints(c)["name"])[0]: c for c in named}
    name = node.get("name") if isinstance(node, dict) else None
    if name not in by_name:
        more = f", or name your own factory with {key}._target_" if targets else ""
        fail(f"{key}.name", name, f"unknown; choose from {', '.join(sorted(by_name))}{more}")
    return _build(by_name[name], node, key)


def _build_target(cls: type, node: dict[str, Any], key: str) -> Any:
    """A user component: `_target_`, the launcher's own options (the class's fields), and the
    rest as the factory's keyword arguments."""
    target = node[TARGET_KEY]
    require(
        isinstance(target, str) and bool(TARGET_PATH.match(target)),
        f"{key}.{TARGET_KEY}",
        target,
        "must be the import path of a callable, package.module.name",
    )
    own = set(own_options(cls))
    options = {k: v for k, v in node.items() if k in own}
    kwargs = {k: v for k, v in node.items() if k not in own and k != TARGET_KEY}
    built = _build(cls, options | {"target": target}, key)
    return dataclasses.replace(built, kwargs=kwargs)


def to_run_config(node: dict[str, Any]) -> RunConfig:
    """Validate a composed config dict and return the frozen RunConfig."""
    cfg: RunConfig = _build(RunConfig, node, "")
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-able data (tuples become lists); a user component as Hydra writes
    it: `_target_`, its keyword arguments, the launcher's options."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            fields = {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
            if isinstance(v, Target):
                target, kwargs = fields.pop("target"), fields.pop("kwargs")
                return {TARGET_KEY: target, **kwargs, **fields}
            return fields
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    out: dict[str, Any] = plain(cfg)
    return out
