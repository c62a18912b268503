"""Models by name: each module exposes `build(cfg, spec) -> torch.nn.Module`."""

from __future__ import annotations

import importlib
from typing import Any

from launcher.config import ModelConfig
from launcher.data import DataSpec

MODELS = {
    "mlp": "launcher.models.mlp",
    "cnn1d": "launcher.models.cnn1d",
    "resnet": "launcher.models.resnet",
}


def build_model(cfg: ModelConfig, spec: DataSpec) -> Any:
    return importlib.import_module(MODELS[cfg.name]).build(cfg, spec)
