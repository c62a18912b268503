"""Write the example's images: small RGB JPEGs of six patterns, in ImageFolder's layout.

    python make_images.py data                 # data/{train,val}/<class>/NNNN.jpg: 360 + 120
    python make_images.py data --train 100 --val 30 --seed 1

Every image is a pattern of one class (horizontal stripes, vertical stripes, checks, dots, a grid,
rings) at a random period and phase, in a random foreground and background colour, with Gaussian
pixel noise, saved as a 40x40 JPEG. Colour says nothing about the class, and every pattern fills
the image, so a random crop of it keeps its label; none turns into another under a horizontal
flip. Seeded: the same arguments write the same files. Needs only Pillow and numpy (both come
with torchvision); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("hstripes", "vstripes", "checks", "dots", "grid", "rings")
SIZE = 40  # pixels a side; the training crops are 32 (conf/data/patterns.yaml)


def _colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A background and a foreground colour far enough apart to see the pattern."""
    while True:
        back, fore = rng.integers(0, 256, size=(2, 3))
        if np.abs(back - fore).sum() >= 200:
            return tuple(int(v) for v in back), tuple(int(v) for v in fore)


def _mask(pattern: str, rng: np.random.Generator) -> np.ndarray:
    """Where the foreground colour goes: a SIZE x SIZE boolean pattern of a random period and
    phase (every pattern fills the image, so a random crop of it is still the same class)."""
    period = rng.uniform(6, 10)
    y, x = np.mgrid[0:SIZE, 0:SIZE] + rng.uniform(0, period, size=(2, 1, 1))
    ys, xs = (y % period) < period / 2, (x % period) < period / 2
    if pattern == "hstripes":
        return ys
    if pattern == "vstripes":
        return xs
    if pattern == "checks":
        return ys ^ xs
    if pattern == "dots":
        return np.hypot(y % period - period / 2, x % period - period / 2) < period / 4
    if pattern == "grid":
        return ((y % period) < period / 4) | ((x % period) < period / 4)
    # rings around a random centre
    cy, cx = rng.uniform(0, SIZE, size=2)
    return (np.hypot(y - cy, x - cx) % period) < period / 2


def draw(pattern: str, rng: np.random.Generator, noise: float) -> Image.Image:
    """One SIZE x SIZE image of `pattern` in random colours, with Gaussian pixel noise."""
    back, fore = _colours(rng)
    pixels = np.where(_mask(pattern, rng)[..., None], fore, back).astype(np.float32)
    pixels += rng.normal(0, noise, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write(root: Path, per_class: dict[str, int], seed: int, noise: float) -> int:
    """Write root/<split>/<class>/NNNN.jpg; returns the number of files written."""
    rng = np.random.default_rng(seed)
    written = 0
    for split, count in per_class.items():
        for pattern in CLASSES:
            folder = root / split / pattern
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                draw(pattern, rng, noise).save(folder / f"{i:04d}.jpg", quality=90)
                written += 1
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder to write train/ and val/ into")
    parser.add_argument("--train", type=int, default=60, help="training images per class")
    parser.add_argument("--val", type=int, default=20, help="validation images per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=24.0, help="pixel noise (std, 0-255)")
    args = parser.parse_args(argv)
    if args.train < 1 or args.val < 1:
        parser.error("--train and --val must be >= 1")
    if any((args.root / split).exists() for split in ("train", "val")):
        parser.error(f"{args.root} already holds train/ or val/; write into a new folder")
    n = write(args.root, {"train": args.train, "val": args.val}, args.seed, args.noise)
    print(f"wrote {n} images of {len(CLASSES)} classes under {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
