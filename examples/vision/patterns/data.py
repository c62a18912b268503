"""The data factory: two torchvision ImageFolders (ROOT/train/<class>/*.jpg, ROOT/val/<class>/*.jpg)
with the usual ImageNet-style transforms, scaled to small images."""

from __future__ import annotations

from pathlib import Path

from torchvision import datasets, transforms

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as most projects use


def make_imagefolder(
    root: str = "data", image_size: int = 32, min_scale: float = 0.35, resize: int = 36
) -> dict:
    """Training: a random crop of `min_scale` to all of the image, resized to `image_size`, and a
    random horizontal flip; evaluation: resized to `resize`, the centre `image_size` crop. Every
    worker process decodes and transforms its own images (data.workers in conf/data/patterns.yaml).
    """
    folder = Path(root).expanduser()
    for split in ("train", "val"):
        if not (folder / split).is_dir():
            raise FileNotFoundError(
                f"no {split}/ folder in {folder.resolve()}; write the images first "
                f"(python make_images.py {root}) or point data.root at them"
            )
    normalize = transforms.Normalize(MEAN, STD)
    train = datasets.ImageFolder(
        str(folder / "train"),
        transform=transforms.Compose(
            [
                transforms.RandomResizedCrop(image_size, scale=(min_scale, 1.0)),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                normalize,
            ]
        ),
    )
    val = datasets.ImageFolder(
        str(folder / "val"),
        transform=transforms.Compose(
            [
                transforms.Resize(resize),
                transforms.CenterCrop(image_size),
                transforms.ToTensor(),
                normalize,
            ]
        ),
    )
    if val.class_to_idx != train.class_to_idx:  # a label must mean the same class in both
        raise ValueError(
            f"the class folders differ: train has {train.classes}, val has {val.classes}"
        )
    return {"train": train, "eval": val, "num_classes": len(train.classes)}
