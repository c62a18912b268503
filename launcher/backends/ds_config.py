"""The DeepSpeed config a BatchPlan implies. Pure: no torch or DeepSpeed import.

The three batch keys come from the plan and are always explicit (never "auto"). A user's own
ds_config.json (`backend.config_file`, e.g. one an earlier run wrote) is the base: its other keys
are kept, and every key the launcher also decides must agree with the plan and the config, so the
launcher, not DeepSpeed's own assertion, is the first to report a mismatch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from launcher.config.execution import BackendConfig, DeepSpeedConfig, TrainerConfig
from launcher.config.optimization import OptimConfig
from launcher.config.optimizers import OPTIMIZER_FACTS
from launcher.config.schema import RunConfig, require_concrete
from launcher.errors import ConfigError
from launcher.types.plan import BatchPlan

# trust ratios per parameter tensor: ZeRO 1+ hands them flat shards
LAYERWISE = tuple(n for n, o in OPTIMIZER_FACTS.items() if o.layerwise)
# DeepSpeed's fused CUDA optimizers
FUSED = {n: o.deepspeed_fused for n, o in OPTIMIZER_FACTS.items() if o.deepspeed_fused}
AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
REDUCE_BUCKET = 500_000_000  # DeepSpeed's default zero_optimization.reduce_bucket_size (elements)


def _load(path: str) -> dict[str, Any]:
    key = "backend.config_file"
    try:
        base = json.loads(Path(path).expanduser().read_text())
    except FileNotFoundError:
        raise ConfigError(f"{key}={path!r}: no such file") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}={path!r}: not a readable JSON file ({exc})") from None
    if not isinstance(base, dict):
        raise ConfigError(f"{key}={path!r}: must hold a JSON object, not {type(base).__name__}")
    return base


def _check(b: DeepSpeedConfig, trainer: TrainerConfig, optimizer: str, device: str) -> None:
    """What DeepSpeed cannot do with this config, as one line each."""
    if trainer.dtype != "float32":
        raise ConfigError(
            f"trainer.dtype={trainer.dtype!r}: backend=deepspeed reduces float32/16 "
            "gradients only; use trainer.dtype=float32 (or backend=accelerate)"
        )
    if optimizer in LAYERWISE and b.zero_stage >= 1:
        raise ConfigError(
            f"backend.zero_stage={b.zero_stage}: the plan's optimizer is {optimizer}, whose "
            "trust ratio is per parameter tensor, but ZeRO 1-3 hand the optimizer flat shards "
            "of many tensors; use backend.zero_stage=0 (or optim.large_batch.enabled=false)"
        )
    if b.mixed_precision == "fp16" and not b.autocast and device != "cuda":
        raise ConfigError(
            "backend.mixed_precision='fp16': DeepSpeed's fp16 mode needs CUDA; use bf16 or no"
        )
    if b.fused_optimizer:
        if device != "cuda":
            raise ConfigError(
                "backend.fused_optimizer=true: DeepSpeed's fused optimizers are CUDA kernels; "
                "this process has no CUDA device"
            )
        if optimizer not in FUSED:
            raise ConfigError(
                f"backend.fused_optimizer=true: DeepSpeed has no fused {optimizer}; it has "
                f"{', '.join(sorted(FUSED))} (the plan's optimizer is {optimizer})"
            )


def _fused_optimizer(optim: OptimConfig, optimizer: str, lr: float, wd: float) -> dict[str, Any]:
    params: dict[str, Any] = {"lr": lr, "betas": list(optim.betas), "weight_decay": wd}
    if FUSED[optimizer] == "Lamb":
        params["eps"] = optim.lamb_eps
    else:  # DeepSpeed's "Adam" defaults to AdamW
        params["eps"] = optim.eps
        params["adam_w_mode"] = OPTIMIZER_FACTS[optimizer].decoupled_decay
    return {"type": FUSED[optimizer], "params": params}


def _agree(base: dict[str, Any], key: str, ours: Any, source: str, path: str) -> None:
    """A key the launcher decides must not say something else in the user's file."""
    node: Any = base
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return
        node = node[part]
    if node != ours:
        raise ConfigError(
            f"backend.config_file={path!r}: {key}={node!r} but the launcher's {source} gives "
            f"{ours!r}; make them agree (or drop the key from the file)"
        )


def ds_config(cfg: RunConfig, plan: BatchPlan, device: str) -> dict[str, Any]:
    """The config `deepspeed.initialize` gets (and ds_config.json holds) for `plan`."""
    b = cfg.backend
    assert isinstance(b, DeepSpeedConfig)
    optimizer = plan.optimizer
    require_concrete(cfg.backend, cfg.trainer)
    _check(b, cfg.trainer, optimizer, device)
    base = _load(b.config_file) if b.config_file else {}
    path = b.config_file or ""
    half = "no" if b.autocast else b.mixed_precision
    ours: dict[str, tuple[Any, str]] = {
        "train_batch_size": (plan.global_batch, "plan (global batch)"),
        "train_micro_batch_size_per_gpu": (plan.micro_batch, "plan (micro-batch)"),
        "gradient_accumulation_steps": (plan.accumulation, "plan (accumulation)"),
        # the launcher's loop owns the step: backward per micro-batch, one engine.step() per step
        "managed_gradient_accumulation": (False, "loop (it calls step() once per step)"),
        "zero_optimization.stage": (b.zero_stage, "backend.zero_stage"),
        "bf16.enabled": (half == "bf16", "backend.mixed_precision"),
        "fp16.enabled": (half == "fp16", "backend.mixed_precision"),
        "torch_autocast.enabled": (b.autocast and b.mixed_precision != "no", "backend.autocast"),
        "gradient_clipping": (cfg.optim.clip_grad_norm, "optim.clip_grad_norm"),
    }
    for key, (value, source) in ours.items():
        _agree(base, key, value, source, path)
    if b.fused_optimizer:
        _agree(base, "optimizer.type", FUSED[optimizer], "backend.fused_optimizer", path)
    elif "optimizer" in base:
        raise ConfigError(
            f"backend.config_file={path!r}: has an optimizer section, but the launcher passes "
            f"its own {optimizer}; drop the section, or set backend.fused_optimizer=true"
        )
    out = dict(base)
    for key, (value, _) in ours.items():
        head, _, leaf = key.rpartition(".")
        node = out
        if head:
            node = out[head] = dict(out.get(head, {}))
        node[leaf] = value
    if out["torch_autocast"]["enabled"]:
        out["torch_autocast"]["dtype"] = AUTOCAST_DTYPES[b.mixed_precision]
    if b.zero_stage >= 1:  # the launcher's optimizers are torch optimizers DeepSpeed does not list
        out["zero_allow_untested_optimizer"] = True
    if b.fused_optimizer:
        out["optimizer"] = _fused_optimizer(cfg.optim, optimizer, plan.lr, plan.weight_decay)
    return out


def write_ds_config(run_dir: Path, config: dict[str, Any]) -> Path:
    """ds_config.json in the run directory, reusable with `backend.config_file` (README)."""
    path = run_dir / "ds_config.json"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def check_buffers(b: BackendConfig, float_buffers: list[str]) -> None:
    """DeepSpeed's half modes cast parameters, not buffers: BatchNorm cannot mix the two."""
    if b.name == "deepspeed" and b.mixed_precision != "no" and not b.autocast and float_buffers:
        raise ConfigError(
            f"backend.mixed_precision={b.mixed_precision!r}: DeepSpeed's {b.mixed_precision} mode "
            f"makes the parameters {b.mixed_precision} but keeps buffers such as "
            f"{float_buffers[0]!r} ({len(float_buffers)} in all, e.g. BatchNorm statistics) in "
            "float32, which the layer cannot mix; add backend.autocast=true (float32 parameters, "
            f"{b.mixed_precision} compute)"
        )


def reduce_bucket_elements(b: DeepSpeedConfig) -> int:
    """ZeRO's gradient reduce bucket (elements): the config file's, else DeepSpeed's default."""
    base = _load(b.config_file) if b.config_file else {}
    zero = base.get("zero_optimization", {})
    return (
        int(zero.get("reduce_bucket_size", REDUCE_BUCKET))
        if isinstance(zero, dict)
        else REDUCE_BUCKET
    )
