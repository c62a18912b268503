"""The groups a user can replace with their own `_target_`: model, data, loss. No torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from launcher.config.checks import (
    CLASS_NAME,
    Target,
    check_seed,
    require,
)


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
        require(self.hidden > 0, "model.hidden", self.hidden, "must be a positive integer")
        require(self.depth >= 0, "model.depth", self.depth, "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class CNN1DConfig(_ModelOptions):
    name: Literal["cnn1d"]
    """registry name"""
    channels: int = 25
    """channels of each of the three strided convolutions (MNIST-1D paper's ConvBase)"""

    def __post_init__(self) -> None:
        require(self.channels > 0, "model.channels", self.channels, "must be a positive integer")


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
        require(self.layers > 0, "model.layers", self.layers, "must be a positive integer")
        require(self.heads > 0, "model.heads", self.heads, "must be a positive integer")
        require(
            self.width > 0 and self.width % self.heads == 0,
            "model.width",
            self.width,
            f"must be a positive multiple of model.heads={self.heads}",
        )
        require(0 <= self.dropout < 1, "model.dropout", self.dropout, "must be in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class UserModelConfig(Target, _ModelOptions):
    """model._target_: a factory returning a torch.nn.Module that maps an input batch to outputs"""

    checkpoint_blocks: tuple[str, ...] = ()
    """class names (or module.ClassName) of the submodules that activation checkpointing
    recomputes as a whole and FSDP2 shards as one unit, e.g. [TransformerBlock]; needed with
    activation_checkpointing=true unless the model declares them (a Transformers model's
    _no_split_modules: checked when the model is built)"""

    def __post_init__(self) -> None:
        for name in self.checkpoint_blocks:
            require(
                bool(CLASS_NAME.match(name)),
                "model.checkpoint_blocks",
                name,
                "each must be a class name, or module.ClassName",
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
        require(self.workers >= 0, "data.workers", self.workers, "must be >= 0")
        require(
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
        require(
            self.num_samples >= 100 and self.num_samples % 10 == 0,
            "data.num_samples",
            self.num_samples,
            "must be a multiple of 10 (classes), at least 100",
        )
        require(0 < self.train_split < 1, "data.train_split", self.train_split, "must be in (0, 1)")
        check_seed("data.data_seed", self.data_seed)

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
        require(self.train_samples > 0, "data.train_samples", self.train_samples, "must be > 0")
        require(self.eval_samples > 0, "data.eval_samples", self.eval_samples, "must be > 0")
        require(self.num_classes > 1, "data.num_classes", self.num_classes, "must be >= 2")
        require(
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
        require(self.train_samples > 0, "data.train_samples", self.train_samples, "must be > 0")
        require(self.num_classes > 1, "data.num_classes", self.num_classes, "must be >= 2")
        require(self.image_size > 0, "data.image_size", self.image_size, "must be > 0")


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
        require(self.seq_len > 0, "data.seq_len", self.seq_len, "must be a positive integer")
        require(
            0 < self.eval_fraction < 1,
            "data.eval_fraction",
            self.eval_fraction,
            "must be in (0, 1)",
        )
        require(bool(self.glob), "data.glob", self.glob, "must be a non-empty glob pattern")


@dataclass(frozen=True, kw_only=True)
class UserDataConfig(Target, _LoaderOptions):
    """data._target_: a factory returning the training and evaluation data (see data/user.py)"""

    workers: int = 0
    """DataLoader worker processes per rank (0 = load in the training process; raise it when
    your __getitem__ reads files or augments)"""
    pack_length: int = 0
    """> 0: your samples are tokenized documents (token ids, or dicts with input_ids), packed in
    order into sequences of this many tokens, no target crossing from one document into the
    next (global_batch_tokens is then exact); 0 = your samples as they are"""

    micro_batch_tokens: int = 0
    """> 0: micro-batches by tokens, not samples: each rank's share of a step grouped by length
    into micro-batches of at most this many padded tokens (your collate_fn pads them; the global
    batch stays as stated); 0 = micro-batches of micro_batch samples"""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.pack_length >= 0, "data.pack_length", self.pack_length, "must be >= 0")
        require(
            self.micro_batch_tokens >= 0,
            "data.micro_batch_tokens",
            self.micro_batch_tokens,
            "must be >= 0",
        )


DataConfig = (
    Mnist1DConfig
    | SyntheticConfig
    | ImageFolderConfig
    | Cifar10Config
    | TextConfig
    | UserDataConfig
)


# ------------------------------------------------------------------------------------------- loss
@dataclass(frozen=True, kw_only=True)
class CrossEntropyConfig:
    name: Literal["cross_entropy"]
    """per-sample cross-entropy on integer targets (a sequence's: the mean over its positions);
    trainer.label_smoothing applies to it"""


@dataclass(frozen=True, kw_only=True)
class UserLossConfig(Target):
    """loss._target_: instantiated to a callable(outputs, targets) -> one loss per sample"""


LossConfig = CrossEntropyConfig | UserLossConfig
