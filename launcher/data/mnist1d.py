"""MNIST-1D (Greydanus 2020), generated offline by `mnist1d.data.make_dataset` and cached.

Never calls the package's download path. The cache file name encodes every generation argument,
and it is written atomically, so concurrent ranks may both generate without harm.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from launcher.config.components import Mnist1DConfig
from launcher.data import DataSpec, Splits
from launcher.data.tensors import TensorPairs

SEQ_LEN = 40  # mnist1d's final_seq_length, which this config does not change


def spec(cfg: Mnist1DConfig) -> DataSpec:
    return DataSpec((1, SEQ_LEN), 10)


def epoch_samples(cfg: Mnist1DConfig) -> tuple[int, str]:
    return cfg.train_samples, f" ({cfg.num_samples:,} generated x train_split {cfg.train_split})"


def _generate(cfg: Mnist1DConfig) -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset  # type: ignore[import-untyped]

    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = cfg.num_samples, cfg.train_split, cfg.data_seed
    data = make_dataset(args)
    return {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}


def load_arrays(cfg: Mnist1DConfig) -> dict[str, np.ndarray]:
    """The four arrays, from the cache or freshly generated (then cached)."""
    cache = Path(os.path.expanduser(cfg.cache_dir))
    path = cache / f"mnist1d_n{cfg.num_samples}_split{cfg.train_split}_seed{cfg.data_seed}.npz"
    if path.exists():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    arrays = _generate(cfg)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache, suffix=".npz", delete=False) as tmp:
        np.savez(tmp, **arrays)  # type: ignore[arg-type]  # the stub: **arrays for allow_pickle
    os.replace(tmp.name, path)
    return arrays


def build(cfg: Mnist1DConfig) -> Splits:
    a = load_arrays(cfg)

    def pairs(x: np.ndarray, y: np.ndarray) -> TensorPairs:
        return TensorPairs(torch.from_numpy(x).float().unsqueeze(1), torch.from_numpy(y).long())

    train, test = pairs(a["x"], a["y"]), pairs(a["x_test"], a["y_test"])
    assert tuple(train.x.shape[1:]) == spec(cfg).input_shape, train.x.shape
    return Splits(train=train, eval=test, spec=spec(cfg))
