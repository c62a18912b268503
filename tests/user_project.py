"""A small user project, written into a folder as a user would have it: a package with a model,
data factories and losses (good ones and broken ones), and a config dir with a recipe and group
options that name them with `_target_`. Tests point `--config-dir` at it and put the folder on the
Python path, as running from the project's own folder does."""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

PACKAGE = "tinyproj"

PARTS = '''
"""A user's model, data and loss factories (and a few broken ones, for the error messages)."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset


class Tiny(nn.Module):
    """A linear classifier of the flattened input (no BatchNorm: ranks can match exactly)."""

    def __init__(self, features: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(features, 16), nn.Tanh())
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        return self.head(self.body(x))


def make_model(features: int = 6, classes: int = 3) -> nn.Module:
    return Tiny(features, classes)


class Points(Dataset):
    """Gaussian blobs: class c is centred at c along every feature (learnable in a few steps)."""

    def __init__(self, n, features, classes, seed, target_len=0):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(classes, (n,), generator=g)
        self.x = self.y[:, None].double() + 0.5 * torch.randn(n, features, generator=g)
        self.x = self.x.float()
        self.target_len = target_len

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        if self.target_len:  # a target per position: does not fit a classifier's outputs
            return self.x[i], self.y[i].repeat(self.target_len)
        return self.x[i], int(self.y[i])


def make_data(n=640, features=6, classes=3, form="dict", target_len=0, shuffle_seed=None):
    if shuffle_seed is not None:  # unseeded randomness: the launcher seeds the factory itself
        n = n + int(torch.randint(2, (1,)))
    train = Points(n, features, classes, seed=1, target_len=target_len)
    test = Points(160, features, classes, seed=2, target_len=target_len)
    if form == "dict":
        return {"train": train, "eval": test, "num_classes": classes}
    if form == "pair":
        return train, test
    if form == "triple":
        return train, test, test
    if form == "iterable":
        return iter(train), test
    if form == "unpaired":
        return [train.x[i] for i in range(n)], test
    if form == "empty":
        return [], test
    raise ValueError(f"unknown form {form!r}")


class Branchy(Tiny):
    """Data-dependent Python control flow: fake tensors cannot trace it, real ones run it."""

    def forward(self, x):
        if x.abs().sum().item() > 1e12:
            raise ValueError("implausible input")
        return super().forward(x)


def broken_model():
    raise FileNotFoundError("no weights at /nowhere/tiny.pt")


def huge_model():
    """Weights of 4 TiB, made by numpy (the meta device cannot count them): building it fails."""
    table = torch.zeros(2**40).numpy()
    return nn.Linear(int(table.shape[0]), 3)


def not_a_model():
    return [1, 2, 3]


def per_sample(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def mean_loss(outputs, targets):
    return F.cross_entropy(outputs, targets)


def make_scalar(features):  # one number per sample: a regression head, no class scores
    return nn.Sequential(nn.Linear(features, 1), nn.Flatten(0))


def squared(outputs, targets):
    return (outputs - targets.float()) ** 2
'''

FILES = {
    f"{PACKAGE}/__init__.py": '"""tinyproj: a user\'s project."""\n',
    f"{PACKAGE}/parts.py": PARTS,
    f"{PACKAGE}/importfails.py": 'raise RuntimeError("boom while importing")\n',
    "conf/recipe/tiny.yaml": """
        # a recipe of the user's own (no @package header: the launcher makes recipes global)
        defaults:
          - override /model: tiny
          - override /data: points
          - override /optim: sgd
          - override /schedule: constant
        global_batch: 64
        optim:
          base_lr: 0.1
          ref_batch: 64
        schedule:
          warmup_epochs: 0
        trainer:
          epochs: 2
          cpu_threads: 1
          progress: false
          tensorboard: false
    """,
    "conf/model/tiny.yaml": f"""
        _target_: {PACKAGE}.parts.make_model
        features: 6
        classes: 3
    """,
    "conf/model/branchy.yaml": f"_target_: {PACKAGE}.parts.Branchy\n",
    "conf/model/broken.yaml": f"_target_: {PACKAGE}.parts.broken_model\n",
    "conf/model/huge.yaml": f"_target_: {PACKAGE}.parts.huge_model\n",
    "conf/model/not_module.yaml": f"_target_: {PACKAGE}.parts.not_a_model\n",
    "conf/model/cnn1d.yaml": "name: cnn1d\nchannels: 3\n",  # shadows a built-in: refused
    "conf/data/points.yaml": f"""
        _target_: {PACKAGE}.parts.make_data
        features: 6
        form: dict
    """,
    "conf/loss/per_sample.yaml": f"_target_: {PACKAGE}.parts.per_sample\n_partial_: true\n",
    "conf/loss/mean.yaml": f"_target_: {PACKAGE}.parts.mean_loss\n_partial_: true\n",
    "conf/loss/squared.yaml": f"_target_: {PACKAGE}.parts.squared\n_partial_: true\n",
    "conf/model/scalar.yaml": f"_target_: {PACKAGE}.parts.make_scalar\nfeatures: 6\n",
}


def write_project(root: Path, files: dict[str, str] | None = None) -> Path:
    """Write the project (`files`: this one's FILES) under `root`; returns its config dir
    (`root`/conf)."""
    for name, text in (FILES if files is None else files).items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dedent(text).lstrip("\n"))
    return root / "conf"
