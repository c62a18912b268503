"""ImageNet-style folders (ROOT/train/<class>/*, ROOT/val/<class>/*) via torchvision."""

from __future__ import annotations

from pathlib import Path

from launcher.config.components import ImageFolderConfig
from launcher.data import DataSpec, Splits
from launcher.errors import ConfigError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _root(cfg: ImageFolderConfig) -> Path:
    if cfg.root is None:
        raise ConfigError(
            "data.root is not set: point it at an ImageNet-style folder "
            "(data.root=/path/with/train/and/val) or run on generated data with data=synthetic"
        )
    root = Path(cfg.root).expanduser()
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ConfigError(
                f"data.root={cfg.root!r}: no {split}/ folder inside; expected "
                "ROOT/train/<class>/*.JPEG and ROOT/val/<class>/*.JPEG (or use data=synthetic)"
            )
    return root


def spec(cfg: ImageFolderConfig) -> DataSpec:
    """Every training crop is image_size x image_size: the worst case is the only case."""
    return DataSpec((3, cfg.image_size, cfg.image_size), cfg.num_classes)


def epoch_samples(cfg: ImageFolderConfig) -> tuple[int, str]:
    return cfg.train_samples, " (data.train_samples; counted from data.root when training)"


def build(cfg: ImageFolderConfig) -> Splits:
    from torchvision import datasets, transforms

    root = _root(cfg)
    normalize = transforms.Normalize(MEAN, STD)
    train_tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(cfg.image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    eval_tf = transforms.Compose(
        [
            transforms.Resize(round(cfg.image_size * 256 / 224)),
            transforms.CenterCrop(cfg.image_size),
            transforms.ToTensor(),
            normalize,
        ]
    )
    train = datasets.ImageFolder(str(root / "train"), transform=train_tf)
    val = datasets.ImageFolder(str(root / "val"), transform=eval_tf)
    if len(train.classes) != cfg.num_classes:
        raise ConfigError(
            f"data.num_classes={cfg.num_classes}: {root / 'train'} has {len(train.classes)} "
            "class folders; set data.num_classes to match"
        )
    return Splits(train=train, eval=val, spec=spec(cfg))
