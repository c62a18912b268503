"""The ImageFolder input pipeline: images/s the launcher's own loader feeds, per worker count.

Writes --images synthetic JPEGs (PIL, --width x --height, default 500 x 375: a common ImageNet
size; quality 90; a smooth random field with pixel noise, so each file is an ImageNet-like
~60-120 KB rather than a trivially compressible flat image) into a temporary ImageFolder layout
(ROOT/train/<class>/*.JPEG, ROOT/val/<class>/*.JPEG), then reads them the way a run does: the
`resnet50` recipe with data=imagefolder (launcher/data/imagefolder.py: torchvision ImageFolder,
PIL decode, RandomResizedCrop(224), RandomHorizontalFlip, ToTensor, Normalize), the launcher's
`train_loader` (GlobalBatchSampler, DataLoader with the config's prefetch_factor and pin_memory
auto: on when --device cuda) at micro-batch --batch, with `data.workers` = each of --workers
(default 1, 2, half and all of this machine's usable cores).

For each worker count the first wave of batches (one per worker: the workers' start and their first
batch) is not timed; then the loader is read for --seconds, and images/s = images read / the time
from the end of that first wave to the last batch read. The training process only iterates (no
model, no copy to a device); its own core is not among the workers' unless the workers take all.

    python bench/input_pipeline.py [--images 1024] [--workers 1,2,16] [--seconds 10] [--out x.json]
    python bench/input_pipeline.py --smoke   # seconds: 32 small JPEGs, workers 0 and 1, 0.5 s each
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from launcher.config.compose import compose_run
from launcher.data import build_splits, loader_settings, train_loader
from launcher.planning.plan import PlanInput, plan_batch


def write_jpegs(root: Path, images: int, classes: int, size: tuple[int, int], seed: int = 0):
    """`images` training JPEGs over `classes` folders, and one per class in val/; returns the
    mean training file size in bytes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    sizes = []
    for split, count in (("train", images), ("val", classes)):
        for c in range(classes):
            (root / split / f"class{c:03d}").mkdir(parents=True)
        for i in range(count):
            coarse = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
            img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
            pixels = np.asarray(img, dtype=np.int16) + rng.normal(0, 6, (height, width, 3))
            img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            path = root / split / f"class{i % classes:03d}" / f"img{i:06d}.JPEG"
            img.save(path, quality=90)
            if split == "train":
                sizes.append(path.stat().st_size)
    return statistics.mean(sizes)


def measure(cfg, device: str, workers: int, seconds: float) -> dict:
    """Read the launcher's training loader with `workers` workers; images/s after the first
    wave."""
    splits = build_splits(cfg.data)
    plan = plan_batch(PlanInput(cfg, 1, len(splits.train)))
    settings = dataclasses.replace(loader_settings(cfg.data, device), workers=workers)
    loader = train_loader(splits.train, plan, rank=0, seed=cfg.seed, settings=settings)
    start = time.perf_counter()
    it = iter(loader)
    first = None
    images = batches = 0
    for k, (x, _) in enumerate(it):
        now = time.perf_counter()
        if k + 1 == max(workers, 1):  # the first wave: workers started, one batch each
            first, warm_s = now, now - start
            continue
        if first is None:
            continue
        images += len(x)
        batches += 1
        if now - first >= seconds:
            break
    else:
        raise RuntimeError("the loader ran out before --seconds: raise --epochs")
    elapsed = time.perf_counter() - first
    del it, loader  # workers shut down before the next count starts
    return {
        "workers": workers,
        "images_per_s": images / elapsed,
        "per_worker": images / elapsed / max(workers, 1),
        "timed_images": images,
        "timed_s": elapsed,
        "first_wave_s": warm_s,
        "pin_memory": settings.pin_memory,
        "prefetch_factor": settings.prefetch_factor,
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    cores = len(os.sched_getaffinity(0))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--batch", type=int, default=64)
    default = sorted({1, 2, cores // 2, cores} - {0})  # 1, 2, half and all the usable cores
    parser.add_argument("--workers", default=",".join(map(str, default)))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--epochs", type=int, default=200, help="passes the sampler may make")
    parser.add_argument("--root", type=Path, help="an existing ImageFolder root (no JPEGs made)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="32 JPEGs of 64 x 48, 0.5 s a count")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.classes, args.width, args.height = 32, 2, 64, 48
        args.batch, args.workers, args.seconds = 4, "0,1", 0.5
    counts = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        made = None
        if root is None:
            root = Path(tmp)
            t0 = time.perf_counter()
            mean_bytes = write_jpegs(root, args.images, args.classes, (args.width, args.height))
            made = {"seconds": time.perf_counter() - t0, "mean_bytes": mean_bytes}
            print(
                f"wrote {args.images} JPEGs of {args.width} x {args.height} (mean "
                f"{mean_bytes / 1e3:.0f} KB) in {made['seconds']:.1f} s"
            )
        images = sum(1 for _ in (root / "train").glob("*/*"))
        classes = sum(1 for p in (root / "train").iterdir() if p.is_dir())
        cfg = compose_run(
            [
                "+recipe=resnet50",
                "data=imagefolder",
                f"data.root={root}",
                f"data.num_classes={classes}",
                f"data.train_samples={images}",
                f"global_batch={args.batch}",
                f"micro_batch={args.batch}",
                f"trainer.epochs={args.epochs}",
            ]
        )
        print(
            f"{cpu_name()}, {cores} usable cores, torch "
            f"{torch.__version__}; launcher train_loader, micro-batch {args.batch}, "
            f"{cfg.data.image_size} px crops, device {args.device}"
        )
        rows = []
        for workers in counts:
            row = measure(cfg, args.device, workers, args.seconds)
            rows.append(row)
            print(
                f"workers {workers:>3}: {row['images_per_s']:,.0f} images/s "
                f"({row['per_worker']:,.0f} per worker; {row['timed_images']} images in "
                f"{row['timed_s']:.1f} s after a first wave of {row['first_wave_s']:.1f} s)"
            )
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": platform.platform(),
        "cpu": cpu_name(),
        "cores": cores,
        "torch": torch.__version__,
        "jpegs": made,
        "image": [args.width, args.height],
        "micro_batch": args.batch,
        "rows": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
