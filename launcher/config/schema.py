"""RunConfig: the typed, validated, frozen form of the composed Hydra config.

Hydra composes a plain dict (see `compose.py`); `to_run_config` turns it into these dataclasses and
raises `ConfigError` naming the key, the value and what is allowed. No torch import here.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

from launcher.config.optimizers import ADAM_FAMILY, SGD_FAMILY
from launcher.errors import ConfigError as ConfigError  # re-exported: the config layer raises it


def _fail(key: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ConfigError(f"{key}={value!r}: {allowed}")


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        _fail(key, value, allowed)


SEED_LIMIT = 2**32  # numpy's generators take seeds in [0, 2^32); torch's would take more


def _seed(key: str, value: int) -> None:
    _require(0 <= value < SEED_LIMIT, key, value, f"must be in [0, {SEED_LIMIT:,})")


# --------------------------------------------------------------------- users' own components
TARGET_KEY = "_target_"
TARGET_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
CLASS_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclass(frozen=True, kw_only=True)
class _Target:
    """A user's component, Hydra's instantiate convention: `_target_` names a callable
    (package.module.name) and the other keys are its keyword arguments, except the launcher's own
    options (the subclass's other fields). Hydra's `_partial_`, `_args_`, `_convert_` and
    `_recursive_` pass through to `hydra.utils.instantiate`."""

    target: str
    """`_target_`: the import path of the factory"""
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """the factory's keyword arguments (nested `_target_` nodes are instantiated too)"""

    @property
    def name(self) -> str:
        return self.target


# ----------------------------------------------------------------------------------------- models
@dataclass(frozen=True, kw_only=True)
class _ModelOptions:
    activation_checkpointing: bool = False
    """recompute each block's activations in backward instead of keeping them (less memory per
    sample, about one more forward of compute); the memory probe measures it"""


@dataclass(frozen=True, kw_only=True)
class MLPConfig(_ModelOptions):
    name: Literal["mlp"]
    """registry name"""
    hidden: int = 100
    """width of each hidden layer"""
    depth: int = 2
    """number of hidden layers"""

    def __post_init__(self) -> None:
        _require(self.hidden > 0, "model.hidden", self.hidden, "must be a positive integer")
        _require(self.depth >= 0, "model.depth", self.depth, "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class CNN1DConfig(_ModelOptions):
    name: Literal["cnn1d"]
    """registry name"""
    channels: int = 25
    """channels of each of the three strided convolutions (MNIST-1D paper's ConvBase)"""

    def __post_init__(self) -> None:
        _require(self.channels > 0, "model.channels", self.channels, "must be a positive integer")


RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


@dataclass(frozen=True, kw_only=True)
class ResNetConfig(_ModelOptions):
    name: Literal["resnet"]
    """registry name"""
    arch: Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"] = "resnet50"
    """torchvision architecture"""
    zero_init_residual: bool = True
    """zero-init the last BN gamma of each residual block (Goyal et al. 2017, sec. 5.1)"""
    stem: Literal["imagenet", "cifar"] = "imagenet"
    """imagenet: 7x7/2 convolution + max-pool; cifar: one 3x3/1 convolution, no pool (32x32
    images keep their resolution; He et al. 2016, sec. 4.2)"""


@dataclass(frozen=True, kw_only=True)
class GPTConfig(_ModelOptions):
    name: Literal["gpt"]
    """registry name"""
    layers: int = 6
    """transformer blocks (pre-LayerNorm, causal self-attention, GELU MLP)"""
    width: int = 384
    """model width (embedding size)"""
    heads: int = 6
    """attention heads; width must divide by it"""
    dropout: float = 0.0
    """dropout in attention and MLP (0 = none)"""

    def __post_init__(self) -> None:
        _require(self.layers > 0, "model.layers", self.layers, "must be a positive integer")
        _require(self.heads > 0, "model.heads", self.heads, "must be a positive integer")
        _require(
            self.width > 0 and self.width % self.heads == 0,
            "model.width",
            self.width,
            f"must be a positive multiple of model.heads={self.heads}",
        )
        _require(0 <= self.dropout < 1, "model.dropout", self.dropout, "must be in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class UserModelConfig(_Target, _ModelOptions):
    """model._target_: a factory returning a torch.nn.Module that maps an input batch to outputs"""

    checkpoint_blocks: tuple[str, ...] = ()
    """class names (or module.ClassName) of the submodules that activation checkpointing
    recomputes as a whole, e.g. [TransformerBlock]; needed with activation_checkpointing=true"""

    def __post_init__(self) -> None:
        for name in self.checkpoint_blocks:
            _require(
                bool(CLASS_NAME.match(name)),
                "model.checkpoint_blocks",
                name,
                "each must be a class name, or module.ClassName",
            )
        _require(
            bool(self.checkpoint_blocks) or not self.activation_checkpointing,
            "model.activation_checkpointing",
            True,
            "a model of your own needs model.checkpoint_blocks: the class names of the blocks to "
            "recompute (e.g. [Block]); the launcher cannot guess them",
        )


ModelConfig = MLPConfig | CNN1DConfig | ResNetConfig | GPTConfig | UserModelConfig


# ------------------------------------------------------------------------------------------- data
@dataclass(frozen=True, kw_only=True)
class _LoaderOptions:
    workers: int = 2
    """DataLoader worker processes per rank (0 = load in the training process)"""
    prefetch_factor: int = 2
    """micro-batches each worker loads ahead"""
    persistent_workers: bool = True
    """keep the evaluation loader's workers alive between evaluations (the training loader is
    one pass over the whole run anyway)"""
    pin_memory: bool | Literal["auto"] = "auto"
    """page-locked host batches for faster copies to the GPU; auto = on when training on CUDA"""

    def __post_init__(self) -> None:
        _require(self.workers >= 0, "data.workers", self.workers, "must be >= 0")
        _require(
            self.prefetch_factor > 0,
            "data.prefetch_factor",
            self.prefetch_factor,
            "must be a positive integer",
        )


@dataclass(frozen=True, kw_only=True)
class Mnist1DConfig:
    name: Literal["mnist1d"]
    """registry name"""
    num_samples: int = 40000
    """samples generated by mnist1d.make_dataset (train + test); a multiple of 10 classes"""
    train_split: float = 0.8
    """fraction of the generated samples used for training"""
    data_seed: int = 42
    """seed of the procedural generator (fixed, so every run sees the same data)"""
    cache_dir: str = "~/.cache/launcher/mnist1d"
    """where the generated arrays are cached"""

    def __post_init__(self) -> None:
        _require(
            self.num_samples >= 100 and self.num_samples % 10 == 0,
            "data.num_samples",
            self.num_samples,
            "must be a multiple of 10 (classes), at least 100",
        )
        _require(
            0 < self.train_split < 1, "data.train_split", self.train_split, "must be in (0, 1)"
        )
        _seed("data.data_seed", self.data_seed)

    @property
    def train_samples(self) -> int:
        return int(self.num_samples * self.train_split)


@dataclass(frozen=True, kw_only=True)
class SyntheticConfig(_LoaderOptions):
    name: Literal["synthetic"]
    """registry name"""
    train_samples: int = 1281167
    """samples in one training epoch (generated per index, nothing held in memory)"""
    eval_samples: int = 50000
    """samples in the evaluation split"""
    input_shape: tuple[int, ...] = (3, 224, 224)
    """shape of one input sample"""
    num_classes: int = 1000
    """number of labels"""

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.train_samples > 0, "data.train_samples", self.train_samples, "must be > 0")
        _require(self.eval_samples > 0, "data.eval_samples", self.eval_samples, "must be > 0")
        _require(self.num_classes > 1, "data.num_classes", self.num_classes, "must be >= 2")
        _require(
            len(self.input_shape) > 0 and all(d > 0 for d in self.input_shape),
            "data.input_shape",
            list(self.input_shape),
            "must be a non-empty list of positive integers",
        )


@dataclass(frozen=True, kw_only=True)
class ImageFolderConfig(_LoaderOptions):
    name: Literal["imagefolder"]
    """registry name"""
    root: str | None = None
    """folder with train/ and val/ class subfolders (ImageNet layout); needed to train"""
    train_samples: int = 1281167
    """images in train/ (ImageNet-1k); used by plan_only when root is not set, checked otherwise"""
    num_classes: int = 1000
    """number of classes"""
    image_size: int = 224
    """training crop size (RandomResizedCrop); evaluation resizes to image_size x 256/224 and
    center-crops image_size"""
    workers: int = 8
    """DataLoader worker processes per rank (JPEG decoding and augmentation)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.train_samples > 0, "data.train_samples", self.train_samples, "must be > 0")
        _require(self.image_size > 0, "data.image_size", self.image_size, "must be > 0")


@dataclass(frozen=True, kw_only=True)
class Cifar10Config(_LoaderOptions):
    name: Literal["cifar10"]
    """registry name"""
    root: str = "~/.cache/launcher/cifar10"
    """folder holding cifar-10-batches-py/ (the python version of the dataset)"""
    download: bool = False
    """fetch it with torchvision (checksum-verified) when root does not hold it; needs internet"""
    verify: bool = True
    """each batch file's MD5 must be the official one; false: any copy in the format (still
    unpickled as numpy arrays only)"""
    workers: int = 4
    """DataLoader worker processes per rank (augmentation)"""

    train_samples = 50000  # the dataset's training split (plan_only counts without the files)


@dataclass(frozen=True, kw_only=True)
class TextConfig:
    name: Literal["text"]
    """registry name"""
    path: str | None = None
    """a text file, or a folder searched with data.glob; null = the Python standard library's
    own sources (present offline on every machine)"""
    glob: str = "auto"
    """files of a folder to read, in sorted order; auto = **/*.py for the standard library,
    **/*.txt for a folder"""
    seq_len: int = 256
    """tokens per sample (bytes: the vocabulary is the 256 byte values)"""
    eval_fraction: float = 0.05
    """the last this fraction of the byte stream is held out for evaluation"""
    cache_dir: str = "~/.cache/launcher/text"
    """a folder's files are concatenated once into a cached byte stream here"""

    def __post_init__(self) -> None:
        _require(self.seq_len > 0, "data.seq_len", self.seq_len, "must be a positive integer")
        _require(
            0 < self.eval_fraction < 1,
            "data.eval_fraction",
            self.eval_fraction,
            "must be in (0, 1)",
        )
        _require(bool(self.glob), "data.glob", self.glob, "must be a non-empty glob pattern")


@dataclass(frozen=True, kw_only=True)
class UserDataConfig(_Target, _LoaderOptions):
    """data._target_: a factory returning the training and evaluation data (see data/user.py)"""

    workers: int = 0
    """DataLoader worker processes per rank (0 = load in the training process; raise it when
    your __getitem__ reads files or augments)"""


DataConfig = (
    Mnist1DConfig
    | SyntheticConfig
    | ImageFolderConfig
    | Cifar10Config
    | TextConfig
    | UserDataConfig
)


# ------------------------------------------------------------------------------------------- loss
def own_options(cls: type) -> tuple[str, ...]:
    """The launcher's own keys in a user component's node (not passed to the factory)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("target", "kwargs"))


@dataclass(frozen=True, kw_only=True)
class CrossEntropyConfig:
    name: Literal["cross_entropy"]
    """per-sample cross-entropy on integer targets (a sequence's: the mean over its positions);
    trainer.label_smoothing applies to it"""


@dataclass(frozen=True, kw_only=True)
class UserLossConfig(_Target):
    """loss._target_: instantiated to a callable(outputs, targets) -> one loss per sample"""


LossConfig = CrossEntropyConfig | UserLossConfig


# -------------------------------------------------------------------------------- optimisation
OPTIMIZER_NAMES = SGD_FAMILY + ADAM_FAMILY


@dataclass(frozen=True, kw_only=True)
class LargeBatchConfig:
    enabled: bool = True
    """swap SGD -> LARS and Adam -> LAMB when the global batch exceeds the threshold"""
    threshold: int = 8192
    """largest global batch that keeps the plain optimizer"""
    optimizer: Literal["auto", "lars", "lamb"] = "auto"
    """what to swap in; auto = LARS for SGD, LAMB for Adam/AdamW"""
    base_lr: float | Literal["same"] = "same"
    """the swapped optimizer's LR at optim.ref_batch (then scaled); same = optim.base_lr"""
    weight_decay: float | Literal["same"] = "same"
    """the swapped optimizer's weight decay; same = optim.weight_decay"""
    warmup_epochs: float = 5.0
    """warmup length once swapped (LARS/LAMB papers use longer warmups at 16k+)"""

    def __post_init__(self) -> None:
        _require(self.threshold > 0, "optim.large_batch.threshold", self.threshold, "must be > 0")
        _require(
            self.base_lr == "same" or self.base_lr > 0,
            "optim.large_batch.base_lr",
            self.base_lr,
            "must be > 0 or same",
        )
        _require(
            self.weight_decay == "same" or self.weight_decay >= 0,
            "optim.large_batch.weight_decay",
            self.weight_decay,
            "must be >= 0 or same",
        )
        _require(
            self.warmup_epochs >= 0,
            "optim.large_batch.warmup_epochs",
            self.warmup_epochs,
            "must be >= 0",
        )


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    name: Literal["sgd", "lars", "adam", "adamw", "lamb"]
    """optimizer, from the OPTIMIZERS registry"""
    base_lr: float
    """learning rate at the reference batch"""
    ref_batch: int
    """global batch at which base_lr was tuned"""
    scaling: Literal["auto", "linear", "sqrt", "none"] = "auto"
    """LR scaling rule; auto = linear for the SGD family, sqrt for the Adam family"""
    weight_decay: float = 0.0
    """decoupled for adamw/lamb, L2 otherwise; never applied to norm and bias parameters"""
    momentum: float = 0.9
    """SGD/LARS momentum"""
    nesterov: bool = False
    """Nesterov momentum (SGD/LARS)"""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam-family moment decays"""
    eps: float = 1e-8
    """Adam-family epsilon (LAMB uses 1e-6 when swapped in)"""
    trust_coefficient: float = 0.001
    """LARS eta"""
    clip_grad_norm: float = 0.0
    """clip the global gradient norm to this before each step; 0 = no clipping"""
    large_batch: LargeBatchConfig = dataclasses.field(default_factory=LargeBatchConfig)
    """the large-batch optimizer swap"""

    def __post_init__(self) -> None:
        _require(self.base_lr > 0, "optim.base_lr", self.base_lr, "must be > 0")
        _require(
            self.ref_batch > 0, "optim.ref_batch", self.ref_batch, "must be a positive integer"
        )
        _require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        _require(0 <= self.momentum < 1, "optim.momentum", self.momentum, "must be in [0, 1)")
        _require(
            not self.nesterov or self.momentum > 0,
            "optim.nesterov",
            self.nesterov,
            "needs optim.momentum > 0",
        )
        _require(
            all(0 <= b < 1 for b in self.betas), "optim.betas", list(self.betas), "each in [0, 1)"
        )
        _require(self.eps > 0, "optim.eps", self.eps, "must be > 0")
        _require(
            self.trust_coefficient > 0,
            "optim.trust_coefficient",
            self.trust_coefficient,
            "must be > 0",
        )
        _require(
            self.clip_grad_norm >= 0, "optim.clip_grad_norm", self.clip_grad_norm, "must be >= 0"
        )

    @property
    def family(self) -> str:
        return "sgd" if self.name in SGD_FAMILY else "adam"

    @property
    def lamb_eps(self) -> float:
        """LAMB's epsilon: optim.eps, or the LAMB paper's 1e-6 when LAMB is swapped in for Adam"""
        return self.eps if self.name == "lamb" else 1e-6


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    decay: Literal["cosine", "step", "poly", "constant"] = "cosine"
    """LR decay after warmup, in samples"""
    warmup_epochs: float = 5.0
    """gradual linear warmup length, used when the scaled LR exceeds the reference LR"""
    warmup_from: Literal["ref", "zero"] = "ref"
    """warmup start: the reference LR (Goyal et al.) or zero"""
    milestones: tuple[float, ...] = (30.0, 60.0, 80.0)
    """epochs at which `step` decay multiplies the LR by gamma"""
    gamma: float = 0.1
    """step decay factor"""
    power: float = 2.0
    """poly decay exponent"""
    end_lr: float = 0.0
    """LR at the end of cosine/poly decay"""

    def __post_init__(self) -> None:
        _require(
            self.warmup_epochs >= 0, "schedule.warmup_epochs", self.warmup_epochs, "must be >= 0"
        )
        _require(
            list(self.milestones) == sorted(self.milestones)
            and all(m > 0 for m in self.milestones),
            "schedule.milestones",
            list(self.milestones),
            "must be increasing positive epochs",
        )
        _require(0 < self.gamma <= 1, "schedule.gamma", self.gamma, "must be in (0, 1]")
        _require(self.power > 0, "schedule.power", self.power, "must be > 0")
        _require(self.end_lr >= 0, "schedule.end_lr", self.end_lr, "must be >= 0")


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
        _require(
            self.zero_stage in ZERO_STAGES,
            "backend.zero_stage",
            self.zero_stage,
            "must be 0, 1, 2 or 3",
        )


BackendConfig = AccelerateConfig | DeepSpeedConfig


@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    epochs: float = 20.0
    """training length in epochs of the training set (converted to samples by the plan)"""
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
        _require(self.epochs > 0, "trainer.epochs", self.epochs, "must be > 0")
        _require(
            self.eval_every_epochs > 0,
            "trainer.eval_every_epochs",
            self.eval_every_epochs,
            "must be > 0",
        )
        _require(self.log_every > 0, "trainer.log_every", self.log_every, "must be > 0")
        limit = self.nonfinite_limit
        _require(limit >= 1, "trainer.nonfinite_limit", limit, "must be >= 1")
        _require(self.spike_factor >= 0, "trainer.spike_factor", self.spike_factor, "must be >= 0")
        _require(
            self.stop_after_samples >= 0,
            "trainer.stop_after_samples",
            self.stop_after_samples,
            "must be >= 0 (0 = train to the end)",
        )
        _require(
            self.stop_cooldown_samples >= 0
            and (self.stop_cooldown_samples == 0 or self.stop_after_samples > 0),
            "trainer.stop_cooldown_samples",
            self.stop_cooldown_samples,
            "must be >= 0, and applies only with trainer.stop_after_samples > 0",
        )
        _require(self.cpu_threads >= 0, "trainer.cpu_threads", self.cpu_threads, "must be >= 0")
        _require(
            0 <= self.label_smoothing < 1,
            "trainer.label_smoothing",
            self.label_smoothing,
            "must be in [0, 1)",
        )
        _require(
            len(set(self.trackers)) == len(self.trackers),
            "trainer.trackers",
            list(self.trackers),
            "must not repeat a tracker",
        )
        _require(
            self.noise_split_every > 0,
            "trainer.noise_split_every",
            self.noise_split_every,
            "must be a positive integer",
        )
        _require(
            0 < self.noise_window <= 1,
            "trainer.noise_window",
            self.noise_window,
            "must be in (0, 1]",
        )
        _require(
            self.devices == "auto" or self.devices > 0,
            "trainer.devices",
            self.devices,
            "must be > 0 or auto",
        )


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    name: str
    """cluster description name"""
    nodes: int | Literal["auto"] = "auto"
    """nodes; auto = the launched topology"""
    devices_per_node: int | Literal["auto"] = "auto"
    """processes (devices) per node; auto = the launched topology"""
    device_memory_gb: float | Literal["auto"] = "auto"
    """memory per device in GB; auto = measured on the device (later: memory planning)"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """device kind; auto = cuda when available, else cpu"""

    def __post_init__(self) -> None:
        for key in ("nodes", "devices_per_node", "device_memory_gb"):
            value = getattr(self, key)
            _require(value == "auto" or value > 0, f"cluster.{key}", value, "must be > 0 or auto")

    @property
    def declared_world_size(self) -> int | None:
        if self.nodes == "auto" or self.devices_per_node == "auto":
            return None
        return self.nodes * self.devices_per_node


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
        _require(
            self.budget_gb == "auto" or self.budget_gb > 0,
            "memory.budget_gb",
            self.budget_gb,
            "must be > 0 or auto",
        )
        _require(0 < self.fraction <= 1, "memory.fraction", self.fraction, "must be in (0, 1]")
        _require(self.margin_gb >= 0, "memory.margin_gb", self.margin_gb, "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    every_samples: int = 0
    """save after the step that crosses each multiple of this many samples; 0 = not by samples"""
    every_minutes: float = 30.0
    """save when this long has passed since the last save; 0 = not by time"""
    keep: int = 2
    """checkpoints kept in run_dir/checkpoints (the newest); the final one is always written"""
    allow_global_batch_change: bool = False
    """on resume, accept a global_batch other than the checkpoint's: the run continues from the
    consumed samples with the new batch (LR by the scaling rule, schedule in samples)"""

    def __post_init__(self) -> None:
        _require(
            self.every_samples >= 0,
            "checkpoint.every_samples",
            self.every_samples,
            "must be >= 0",
        )
        _require(
            self.every_minutes >= 0,
            "checkpoint.every_minutes",
            self.every_minutes,
            "must be >= 0",
        )
        _require(self.keep >= 1, "checkpoint.keep", self.keep, "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class RampConfig:
    start_batch: int | None = None
    """first global batch of a ramp-up that doubles the batch up to global_batch; null = none"""
    samples: int = 0
    """fixed mode: samples the ramp-up lasts: each doubling gets an equal share, and a stage ends
    at the first step boundary at or after its share"""
    mode: Literal["fixed", "adaptive"] = "fixed"
    """fixed: doublings on the ramp.samples schedule; adaptive: the batch grows when the measured
    gradient noise scale says it pays (launcher/planning/adaptive.py)"""
    noise_factor: float = 1.0
    """adaptive: grow to the largest doubling <= B_simple / noise_factor (McCandlish et al. 2018:
    the most efficient batch is near the noise scale)"""
    min_steps: int = 100
    """adaptive: optimizer steps at a batch before it may grow (the noise-scale estimate needs
    measurements: with one micro-batch on one rank every noise_split_every-th step is one)"""

    def __post_init__(self) -> None:
        _require(
            self.start_batch is None or self.start_batch > 0,
            "ramp.start_batch",
            self.start_batch,
            "must be a positive integer or null",
        )
        _require(self.samples >= 0, "ramp.samples", self.samples, "must be >= 0")
        fixed = self.mode == "fixed"
        _require(
            self.start_batch is None or not fixed or self.samples > 0,
            "ramp.samples",
            self.samples,
            "must be > 0 when ramp.start_batch is set (ramp.mode=fixed)",
        )
        _require(
            fixed or self.samples == 0,
            "ramp.samples",
            self.samples,
            "applies to ramp.mode=fixed only; the adaptive ramp decides by the noise scale (0)",
        )
        _require(
            fixed or self.start_batch is not None,
            "ramp.mode",
            self.mode,
            "adaptive needs ramp.start_batch (the batch it starts from)",
        )
        _require(self.noise_factor > 0, "ramp.noise_factor", self.noise_factor, "must be > 0")
        _require(self.min_steps > 0, "ramp.min_steps", self.min_steps, "must be > 0")


SLURM_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+(:\d{2}){0,2}$")
SLURM_NAME = re.compile(r"^[A-Za-z0-9_.,:+-]+$")  # partition and account names
SLURM_SIZE = re.compile(r"^\d+[KMGT]?$")  # sbatch memory sizes: 64G, 512000M, 0 (= all)
SLURM_OPTION = re.compile(r"^--[A-Za-z][A-Za-z0-9-]*(=[^\s\x00-\x1f'\"`$\\;&|<>]+)?$")


def slurm_options(text: str) -> tuple[str, ...]:
    """`slurm.extra` written as one plain string, `--qos high --exclusive`: one option per `--`,
    a value after a space or an `=` (-> ("--qos=high", "--exclusive"))."""
    options: list[str] = []
    for word in text.split():
        if word.startswith("--") or not options or "=" in options[-1]:
            options.append(word)
        else:
            options[-1] += f"={word}"
    return tuple(options)


@dataclass(frozen=True, kw_only=True)
class SlurmConfig:
    template: Literal["auto", "single_node", "multi_node", "multi_node_srun"] = "auto"
    """slurm/ template `python -m launcher.slurm` renders: auto = single_node for one node, else
    multi_node (torchrun per node); multi_node_srun = one srun task per device"""
    time: str | int = "24:00:00"
    """time limit (sbatch --time: MINUTES, HH:MM:SS or D-HH:MM:SS)"""
    partition: str | None = None
    """sbatch --partition; null = the cluster's default"""
    account: str | None = None
    """sbatch --account; null = the user's default"""
    signal_seconds: int = 120
    """ask Slurm for SIGUSR1 this long before the time limit: checkpoint at the next step, then
    `scontrol requeue`; 0 = no signal. Slurm may deliver it up to ~60 s late: cover that, a step
    and a save"""
    cpus_per_task: int | Literal["auto"] = "auto"
    """sbatch --cpus-per-task; auto = the training processes a task runs (torchrun's per node, or
    1 for an srun task per device) x (1 + data.workers, the loader workers of each)"""
    mem: str | None = "auto"
    """host memory per node (sbatch --mem: 64G, 512000M; 0 = all of it); auto = --mem-per-gpu=
    cluster.device_memory_gb on GPU nodes (as much RAM as each GPU holds: pinned batches and a
    CPU copy of the state for checkpoints), on CPU nodes devices_per_node x device_memory_gb,
    or 0 (the whole node) when that is auto; null = no flag (the cluster's default)"""
    mem_per_gpu: str | None = None
    """sbatch --mem-per-gpu (e.g. 120G), instead of mem"""
    exclusive: bool = False
    """sbatch --exclusive: the nodes are the job's alone"""
    extra: tuple[str, ...] | str = ()
    """further sbatch options: a plain string `--qos high --exclusive` (a value after a space;
    Hydra's grammar wants an `=` inside a value quoted) or a list ['--qos=high']"""

    def __post_init__(self) -> None:
        if isinstance(self.extra, str):
            object.__setattr__(self, "extra", slurm_options(self.extra))
        if isinstance(self.time, int):  # slurm.time=90: Hydra reads minutes as a number
            object.__setattr__(self, "time", str(self.time))
        _require(
            bool(SLURM_TIME.match(self.time)),
            "slurm.time",
            self.time,
            "must be MINUTES, HH:MM:SS or D-HH:MM:SS",
        )
        _require(
            self.signal_seconds >= 0, "slurm.signal_seconds", self.signal_seconds, "must be >= 0"
        )
        for key in ("partition", "account"):
            value = getattr(self, key)
            ok = value is None or bool(SLURM_NAME.match(value))
            _require(ok, f"slurm.{key}", value, "must be a Slurm name (letters, digits, _.,:+-)")
        _require(
            self.cpus_per_task == "auto" or self.cpus_per_task > 0,
            "slurm.cpus_per_task",
            self.cpus_per_task,
            "must be > 0 or auto",
        )
        for key in ("mem", "mem_per_gpu"):
            value = getattr(self, key)
            ok = value is None or (key == "mem" and value == "auto") or SLURM_SIZE.match(value)
            _require(bool(ok), f"slurm.{key}", value, "must be a size like 64G or 512000M")
        _require(
            self.mem_per_gpu is None or self.mem in (None, "auto"),
            "slurm.mem_per_gpu",
            self.mem_per_gpu,
            f"give slurm.mem or slurm.mem_per_gpu, not both (slurm.mem={self.mem!r})",
        )
        for option in self.extra:
            _require(
                bool(SLURM_OPTION.match(option)),
                "slurm.extra",
                option,
                "each must be one sbatch option, --name or --name=value (no spaces, quotes or "
                "shell characters)",
            )


# ---------------------------------------------------------------------------------------- run
@dataclass(frozen=True, kw_only=True)
class RunConfig:
    recipe: str
    """recipe that was composed (+recipe=NAME)"""
    global_batch: int
    """samples per optimizer step, over all devices and accumulation steps"""
    micro_batch: int | Literal["auto"]
    """samples per device per forward/backward; auto = largest divisor under the caps"""
    max_micro_batch: int
    """upper bound for an automatic micro-batch"""
    seed: int
    """seed of model init and shuffling"""
    plan_only: bool
    """print and save the plan, then exit without training"""
    run_dir: str | None
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
    global batch, from an earlier run's noise scale (launcher/planning/prior.py); null = the earlier
    run's own final result"""
    objective: Literal["eval_accuracy", "eval_loss", "samples_to_target"] = "eval_accuracy"
    """what each job returns to a Hydra sweeper (launcher/training/objective.py): the final eval
    accuracy (maximize), the final eval loss, or the samples to target_accuracy (minimize)"""

    def __post_init__(self) -> None:
        _require(self.global_batch > 0, "global_batch", self.global_batch, "must be > 0")
        _seed("seed", self.seed)
        ok = self.run_dir is None or bool(self.run_dir.strip())
        _require(ok, "run_dir", self.run_dir, "empty; give a folder (or leave it out)")
        _require(
            self.objective != "samples_to_target" or self.target_accuracy is not None,
            "objective",
            self.objective,
            "needs target_accuracy (the eval accuracy whose samples it counts)",
        )
        _require(
            self.micro_batch == "auto" or self.micro_batch > 0,
            "micro_batch",
            self.micro_batch,
            "must be auto or a positive integer",
        )
        _require(self.max_micro_batch > 0, "max_micro_batch", self.max_micro_batch, "must be > 0")
        _require(
            self.target_accuracy is None or 0 < self.target_accuracy < 1,
            "target_accuracy",
            self.target_accuracy,
            "must be null or in (0, 1)",
        )
        _require(
            self.trainer.label_smoothing == 0 or isinstance(self.loss, CrossEntropyConfig),
            "trainer.label_smoothing",
            self.trainer.label_smoothing,
            "applies to the built-in cross-entropy only; give your loss its own setting",
        )


def require_concrete(cfg: RunConfig) -> None:
    """Raise if a device-dependent `auto` is still unresolved (run.on_device resolves them): code
    that builds, probes or trains must never guess what `auto` means."""
    if cfg.backend.mixed_precision == "auto" or cfg.trainer.channels_last == "auto":
        raise RuntimeError(
            "backend.mixed_precision / trainer.channels_last are 'auto': resolve them for the "
            "device first (launcher.training.job.on_device)"
        )


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
        _fail(key, value, f"must be {_describe(hint)}")
    if origin is Literal:
        _require(value in typing.get_args(hint), key, value, f"must be {_describe(hint)}")
        return value
    if origin is tuple:
        _require(isinstance(value, (list, tuple)), key, value, f"must be {_describe(hint)}")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        _require(len(value) == len(args), key, value, f"must be {_describe(hint)}")
        return tuple(
            _coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if hint is type(None):
        _require(value is None, key, value, "must be null")
        return None
    if hint is bool:
        _require(isinstance(value, bool), key, value, "must be true or false")
        return value
    if hint is int:
        _require(
            isinstance(value, int) and not isinstance(value, bool), key, value, "must be an integer"
        )
        return value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _require(ok, key, value, "must be a number")
        _require(math.isfinite(value), key, value, "must be a finite number")
        return float(value)
    if hint is str:
        _require(isinstance(value, str), key, value, "must be a string")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
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
        _fail(key, node, "must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(node) - set(fields))
    if unknown:
        _fail(prefix + unknown[0], node[unknown[0]], f"unknown key; allowed: {', '.join(fields)}")
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
    return cls(**kwargs)


def _build_named(options: tuple[type, ...], node: Any, key: str) -> Any:
    """Build the dataclass of a union that `node['name']` selects (model, data, loss), or the
    union's user component when the node has a `_target_`."""
    targets = [c for c in options if issubclass(c, _Target)]
    if isinstance(node, dict) and TARGET_KEY in node and targets:
        return _build_target(targets[0], node, key)
    named = [c for c in options if c not in targets]
    by_name = {typing.get_args(typing.get_type_hints(c)["name"])[0]: c for c in named}
    name = node.get("name") if isinstance(node, dict) else None
    if name not in by_name:
        more = f", or name your own factory with {key}._target_" if targets else ""
        _fail(f"{key}.name", name, f"unknown; choose from {', '.join(sorted(by_name))}{more}")
    return _build(by_name[name], node, key)


def _build_target(cls: type, node: dict[str, Any], key: str) -> Any:
    """A user component: `_target_`, the launcher's own options (the class's fields), and the
    rest as the factory's keyword arguments."""
    target = node[TARGET_KEY]
    _require(
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
    return _build(RunConfig, node, "")


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-able data (tuples become lists); a user component as Hydra writes
    it: `_target_`, its keyword arguments, the launcher's options."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            fields = {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
            if isinstance(v, _Target):
                target, kwargs = fields.pop("target"), fields.pop("kwargs")
                return {TARGET_KEY: target, **kwargs, **fields}
            return fields
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)
