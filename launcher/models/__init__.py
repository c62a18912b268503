"""Models by name: each module exposes `build(cfg, spec) -> torch.nn.Module` and `BLOCKS`, the
submodule types that activation checkpointing recomputes as a whole."""

from __future__ import annotations

import importlib
from typing import Any

from launcher.config import ModelConfig
from launcher.data import DataSpec

MODELS = {
    "mlp": "launcher.models.mlp",
    "cnn1d": "launcher.models.cnn1d",
    "resnet": "launcher.models.resnet",
    "gpt": "launcher.models.gpt",
}


def build_model(cfg: ModelConfig, spec: DataSpec) -> Any:
    module = importlib.import_module(MODELS[cfg.name])
    model = module.build(cfg, spec)
    if cfg.activation_checkpointing:
        from launcher.models.checkpointing import checkpoint_blocks

        checkpoint_blocks(model, module.BLOCKS)
    return model
