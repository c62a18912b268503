"""How a job runs: backend, trainer, memory, checkpoint. No torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from launcher.config.checks import (
    require,
)


# ------------------------------------------------------------------ backend / trainer / cluster
@dataclass(frozen=True, kw_only=True)
class AccelerateConfig:
    name: Literal["accelerate"]
    """training backend, from the BACKENDS registry"""
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = "no"
    """autocast precision; parameters and optimizer state stay float32. auto = bf16 on CUDA
    (fp16 on GPUs without bf16), no on CPU"""


ZERO_STAGES = (0, 1, 2, 3)


@dataclass(frozen=True, kw_only=True)
class DeepSpeedConfig:
    name: Literal["deepspeed"]
    """training backend, from the BACKENDS registry"""
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = "no"
    """bf16/fp16 compute: DeepSpeed's bf16/fp16 modes (half-precision parameters and gradients,
    float32 master weights), or with `autocast` its torch_autocast mode. auto = bf16 on CUDA
    (fp16 on GPUs without bf16), no on CPU"""
    autocast: bool = False
    """mixed precision as autocast: float32 parameters (as backend=accelerate); needed for models
    with float buffers such as BatchNorm, which the half modes keep in float32"""
    zero_stage: int = 0
    """ZeRO stage: 0 replicated, 1 optimizer state, 2 + gradients, 3 + parameters partitioned"""
    fused_optimizer: bool = False
    """CUDA only: DeepSpeed's fused Adam/AdamW/LAMB instead of the launcher's own optimizer"""
    config_file: str | None = None
    """a ds_config.json to start from (e.g. one a run wrote); its batch keys must match the plan"""

    def __post_init__(self) -> None:
        require(
            self.zero_stage in ZERO_STAGES,
            "backend.zero_stage",
            self.zero_stage,
            "must be 0, 1, 2 or 3",
        )


@dataclass(frozen=True, kw_only=True)
class FsdpConfig:
    name: Literal["fsdp"]
    """training backend, from the BACKENDS registry"""
    mixed_precision: Literal["no", "bf16", "auto"] = "no"
    """FSDP2's parameter dtype: the float32 sharded parameters are all-gathered in bf16 for
    forward and backward (optimizer state stays float32). auto = bf16 on CUDA, no on CPU. No
    fp16: its loss scaling would need a sharded gradient scaler"""
    reduce_dtype: Literal["float32", "param"] = "float32"
    """with mixed_precision=bf16, the dtype gradients are reduced in: float32, or the parameter
    dtype (half the traffic, at bf16's precision); without it, the parameters' own dtype"""
    reshard_after_forward: bool = True
    """free each block's gathered parameters after its forward and gather them again for
    backward (parameters fully sharded, like ZeRO 3); false keeps them until backward (less
    communication, like ZeRO 2). The root module keeps its parameters either way"""


BackendConfig = AccelerateConfig | DeepSpeedConfig | FsdpConfig


@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    epochs: float = 20.0
    """training length in epochs of the training set (converted to samples by the plan)"""
    samples: int = 0
    """training length in samples (the LR decay spans them): replaces trainer.epochs; 0 =
    trainer.epochs says it"""
    tokens: int = 0
    """trainer.samples in tokens, for sequence data: / data.seq_len sequences, exactly; 0 = not
    in tokens"""
    eval_every_epochs: float = 1.0
    """evaluate on the held-out split every this many epochs (and always at the end)"""
    log_every: int = 10
    """optimizer steps between metric lines"""
    progress: bool = True
    """show a progress bar on rank 0"""
    cpu_threads: int = 0
    """torch intra-op threads per process; 0 leaves torch's default"""
    dtype: Literal["float32", "float64"] = "float32"
    """parameter dtype (float64 for numerical parity checks)"""
    tensorboard: bool = True
    """write TensorBoard event files to the run directory"""
    trackers: tuple[Literal["wandb", "mlflow"], ...] = ()
    """also log to these through Accelerate's trackers (opt-in; the package must be installed
    and configured the usual way, e.g. WANDB_MODE=offline, MLFLOW_TRACKING_URI)"""
    label_smoothing: float = 0.0
    """cross-entropy label smoothing in training (evaluation loss stays plain cross-entropy)"""
    compile: bool = False
    """torch.compile the model (in place, so checkpoints keep the plain module's keys)"""
    channels_last: bool | Literal["auto"] = "auto"
    """store 4-D weights (convolutions) channels-last, the layout tensor cores want; auto = on
    CUDA. No effect on models without 4-D weights"""
    cudnn_benchmark: bool = False
    """on CUDA, let cuDNN time its convolution algorithms for each new input shape and keep the
    fastest (torch.backends.cudnn.benchmark). Off by default (as in Lightning): the memory probe's
    verify step runs with it, and its autotuning workspaces count in the peak it measures"""
    devices: int | Literal["auto"] = "auto"
    """worker processes on this machine for a plain `python -m launcher`, started with PyTorch's
    elastic launcher; auto = the cluster's devices_per_node if declared, else every visible GPU,
    else 1. Under torchrun / accelerate / deepspeed / srun it must match what they started"""
    oom_recovery: bool | Literal["auto"] = "auto"
    """on out of memory anywhere: drop the step, halve the micro-batch, double the accumulation
    (gradients are then reduced after every rank's micro-steps, not overlapped with backward);
    auto = on wherever the backend allows it (not under ZeRO 2/3, which reduce inside backward)"""
    noise_scale: bool = True
    """measure the gradient noise scale every step from gradient norms the loop has (logged, and
    the batch-size advice at the end of the run); false = off"""
    noise_split_every: int = 10
    """with one micro-batch per step on one rank (nothing local to compare), every this many
    steps run the micro-batch as two halves to measure (those steps cost a little more)"""
    noise_window: float = 0.05
    """time constant of the noise-scale moving averages as a fraction of the run's samples (each
    step weighs by its batch: small batches average over more steps)"""
    nonfinite_limit: int = 3
    """steps in a row with a non-finite loss or gradient (each skipped: nothing applied) before
    the run stops as diverged (exit 4)"""
    spike_factor: float = 5.0
    """a step whose loss is above this x the mean of the last 20 applied steps (on any rank) is
    a loss_spike event; 0 = no check"""
    diverge_factor: float = 10.0
    """the run stops as diverged (exit 4) once the median loss of the last 20 applied steps is
    above this x the loss at the start of the run: divergence that stays finite; 0 = no check"""
    skip_spikes: bool = False
    """do not apply a loss-spike step (its samples are consumed, nothing learned)"""
    stop_after_samples: int = 0
    """end the run early at the first step whose consumed samples (counted from the run's start)
    reach this: evaluate, save, stop; plan and LR schedule unchanged, so resuming without it trains
    on (a branch of launcher.cbs, a time-boxed slice of a long run); 0 = train to the end"""
    stop_cooldown_samples: int = 0
    """with stop_after_samples: the LR falls linearly to 0 over this many samples before the stop
    (a warmup-stable-decay cooldown: the stopped model is annealed as a finished run's is)"""

    def __post_init__(self) -> None:
        require(self.epochs > 0, "trainer.epochs", self.epochs, "must be > 0")
        require(self.samples >= 0, "trainer.samples", self.samples, "must be >= 0")
        require(self.tokens >= 0, "trainer.tokens", self.tokens, "must be >= 0")
        require(
            self.eval_every_epochs > 0,
            "trainer.eval_every_epochs",
            self.eval_every_epochs,
            "must be > 0",
        )
        require(self.log_every > 0, "trainer.log_every", self.log_every, "must be > 0")
        limit = self.nonfinite_limit
        require(limit >= 1, "trainer.nonfinite_limit", limit, "must be >= 1")
        require(self.spike_factor >= 0, "trainer.spike_factor", self.spike_factor, "must be >= 0")
        factor = self.diverge_factor
        require(factor == 0 or factor > 1, "trainer.diverge_factor", factor, "must be > 1, or 0")
        require(
            self.stop_after_samples >= 0,
            "trainer.stop_after_samples",
            self.stop_after_samples,
            "must be >= 0 (0 = train to the end)",
        )
        require(
            self.stop_cooldown_samples >= 0
            and (self.stop_cooldown_samples == 0 or self.stop_after_samples > 0),
            "trainer.stop_cooldown_samples",
            self.stop_cooldown_samples,
            "must be >= 0, and applies only with trainer.stop_after_samples > 0",
        )
        require(self.cpu_threads >= 0, "trainer.cpu_threads", self.cpu_threads, "must be >= 0")
        require(
            0 <= self.label_smoothing < 1,
            "trainer.label_smoothing",
            self.label_smoothing,
            "must be in [0, 1)",
        )
        require(
            len(set(self.trackers)) == len(self.trackers),
            "trainer.trackers",
            list(self.trackers),
            "must not repeat a tracker",
        )
        require(
            self.noise_split_every > 0,
            "trainer.noise_split_every",
            self.noise_split_every,
            "must be a positive integer",
        )
        require(
            0 < self.noise_window <= 1,
            "trainer.noise_window",
            self.noise_window,
            "must be in (0, 1]",
        )
        require(
            self.devices == "auto" or self.devices > 0,
            "trainer.devices",
            self.devices,
            "must be > 0 or auto",
        )


@dataclass(frozen=True, kw_only=True)
class MemoryConfig:
    probe: bool = True
    """measure the model's memory and cap micro_batch=auto by it"""
    budget_gb: float | Literal["auto"] = "auto"
    """bytes a step may use: on CPU the budget per process (auto = its share of available RAM);
    on GPU an optional cap below the device's free memory"""
    fraction: float = 0.9
    """share of the free memory the budget may take"""
    margin_gb: float = 0.5
    """held back from the budget (fragmentation, workspaces, what the probe cannot see)"""
    cache_dir: str = "~/.cache/launcher/memory"
    """measured profiles, keyed by everything that changes them"""
    cache: Literal["use", "refresh", "off"] = "use"
    """use: read and write the cache; refresh: measure again and overwrite (also forgets the
    out-of-memory ceilings it holds); off: neither read nor write it"""

    def __post_init__(self) -> None:
        require(
            self.budget_gb == "auto" or self.budget_gb > 0,
            "memory.budget_gb",
            self.budget_gb,
            "must be > 0 or auto",
        )
        require(0 < self.fraction <= 1, "memory.fraction", self.fraction, "must be in (0, 1]")
        require(self.margin_gb >= 0, "memory.margin_gb", self.margin_gb, "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    every_samples: int = 0
    """save after the step that crosses each multiple of this many samples; 0 = not by samples"""
    every_tokens: int = 0
    """checkpoint.every_samples in tokens, for sequence data: / data.seq_len sequences, exactly;
    0 = not in tokens"""
    every_minutes: float = 30.0
    """save when this long has passed since the last save; 0 = not by time"""
    keep: int = 2
    """checkpoints kept in run_dir/checkpoints (the newest); the final one is always written"""
    allow_global_batch_change: bool = False
    """on resume, accept a global_batch other than the checkpoint's: the run continues from the
    consumed samples with the new batch (LR by the scaling rule, schedule in samples)"""

    def __post_init__(self) -> None:
        require(
            self.every_samples >= 0,
            "checkpoint.every_samples",
            self.every_samples,
            "must be >= 0",
        )
        require(
            self.every_tokens >= 0, "checkpoint.every_tokens", self.every_tokens, "must be >= 0"
        )
        require(
            self.every_minutes >= 0,
            "checkpoint.every_minutes",
            self.every_minutes,
            "must be >= 0",
        )
        require(self.keep >= 1, "checkpoint.keep", self.keep, "must be >= 1")
