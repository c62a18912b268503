"""CIFAR-10, python version (ROOT/cifar-10-batches-py), downloaded by torchvision on request.

The launcher reads the format itself (five training batches and a test batch, each a pickled dict
of `data`, uint8 N x 3072 in R, G, B planes, and `labels`): each file's MD5 must be the official
one (torchvision's list; `data.verify=false` takes a copy of your own in that format, as the tests'
generated one), and the unpickler gives the files numpy arrays and nothing else, so a crafted
batch cannot run code either way. Shapes and labels are checked. Downloading goes through
torchvision (checksum-verified). Augmentation (He et al. 2016, sec. 4.2): a random
32x32 crop of the image zero-padded by 4, and a horizontal flip; both splits are normalised by the
training set's channel means and deviations.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from launcher.config.components import Cifar10Config
from launcher.data import DataSpec, Splits
from launcher.errors import ConfigError

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CLASSES = 10


def spec(cfg: Cifar10Config) -> DataSpec:
    return DataSpec((3, 32, 32), CLASSES)


def epoch_samples(cfg: Cifar10Config) -> tuple[int, str]:
    return cfg.train_samples, " (CIFAR-10's training split)"


def _folder(cfg: Cifar10Config) -> Path:
    root = Path(cfg.root).expanduser()
    folder = root / FOLDER
    if not folder.is_dir() and cfg.download:
        import fcntl

        from torchvision.datasets import CIFAR10

        root.mkdir(parents=True, exist_ok=True)
        with open(root / ".download.lock", "w") as lock:  # ranks of one machine: one download
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not folder.is_dir():
                CIFAR10(str(root), train=True, download=True)  # fetches, checks MD5s, extracts
    if not folder.is_dir():
        raise ConfigError(
            f"data.root={cfg.root!r}: no {FOLDER}/ inside; data.download=true fetches it "
            "(needs internet), or point data.root at a folder that holds it"
        )
    return folder


# What a CIFAR-10 python batch may ask the unpickler for: numpy arrays and their dtypes (as
# numpy of any age pickles them), bytes under Python 2's latin1. Anything else (os.system, ...)
# is refused before it is called.
ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _DataOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which data never needs")
        return super().find_class(module, name)


def _md5(path: Path) -> str:
    import hashlib

    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def known_md5s() -> dict[str, str]:
    """The official files' MD5s, as torchvision checks them."""
    from torchvision.datasets import CIFAR10

    return dict(CIFAR10.train_list + CIFAR10.test_list)


def read_batches(
    folder: Path, names: tuple[str, ...], verify: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images N x 3 x 32 x 32, int64 labels N) from the pickled batch files: each checked
    against the official MD5 (`verify`), and unpickled allowing numpy arrays only."""
    images, labels = [], []
    md5s = known_md5s() if verify else {}
    for name in names:
        path = folder / name
        if not path.is_file():
            raise ConfigError(f"data.root: {path} is missing (a CIFAR-10 python batch file)")
        if verify and _md5(path) != md5s[name]:
            raise ConfigError(
                f"data.root: {path} is not the official CIFAR-10 file (its MD5 differs); "
                "replace it (data.download=true), or data.verify=false for a copy of your own"
            )
        try:
            with open(path, "rb") as f:
                entry = _DataOnly(f, encoding="latin1").load()  # the files are Python 2 pickles
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
            why = f"data.root: {path} cannot be read as a CIFAR-10 batch ({exc})"
            raise ConfigError(why) from None
        if not isinstance(entry, dict) or "data" not in entry or "labels" not in entry:
            raise ConfigError(f"data.root: {path} is not a CIFAR-10 batch (no data and labels)")
        data = np.asarray(entry["data"], dtype=np.uint8)
        y = np.asarray(entry["labels"], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(y) != len(data):
            raise ConfigError(
                f"data.root: {path} holds data of shape {data.shape} and {len(y)} labels; "
                "CIFAR-10 batches are N x 3072 uint8 with N labels"
            )
        if len(y) and (y.min() < 0 or y.max() >= CLASSES):
            raise ConfigError(f"data.root: {path} has labels outside 0..{CLASSES - 1}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(y)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


class Images(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """uint8 images held in memory; `transform` runs per sample (in the loader's workers)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Any) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.labels[index])


def build(cfg: Cifar10Config) -> Splits:
    from torchvision.transforms import v2

    folder = _folder(cfg)
    train_x, train_y = read_batches(folder, TRAIN_FILES, cfg.verify)
    test_x, test_y = read_batches(folder, (TEST_FILE,), cfg.verify)
    to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    augment = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), *to_float])
    return Splits(
        train=Images(train_x, train_y, augment),
        eval=Images(test_x, test_y, v2.Compose(to_float)),
        spec=spec(cfg),
    )
