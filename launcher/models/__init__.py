"""Models by name, or your own through `model._target_`.

A built-in module exposes `build(cfg, spec) -> torch.nn.Module` and `BLOCKS`, the submodule types
that activation checkpointing recomputes as a whole. Your factory returns a torch.nn.Module that
maps an input batch to outputs; `model.checkpoint_blocks` names its block classes for activation
checkpointing and FSDP2's units (where it names none: those a Transformers model declares in
`_no_split_modules`). Every build is fresh (the memory probe builds several models); a model
instance handed to launcher.run() is the one exception: it is trained in place, and copied for the
probe.
"""

from __future__ import annotations

import importlib
from typing import Any

from launcher.config.checks import TARGET_KEY
from launcher.config.components import ModelConfig, UserModelConfig
from launcher.config.targets import instantiate
from launcher.data import DataSpec
from launcher.errors import ConfigError
from launcher.types.provided import copy_into_context, is_provided_instance

MODELS = {
    "mlp": "launcher.models.mlp",
    "cnn1d": "launcher.models.cnn1d",
    "resnet": "launcher.models.resnet",
    "gpt": "launcher.models.gpt",
}


def build_model(cfg: ModelConfig, spec: DataSpec, fresh: bool = True) -> Any:
    """The model, built in the current default device and dtype. `fresh=False` (the model a run
    trains) may return an instance handed to launcher.run() itself."""
    if isinstance(cfg, UserModelConfig):
        from launcher.models.outputs import drop_cache  # heavy: torch

        model = _user_model(cfg, fresh)
        drop_cache(model)  # a Transformers model's: training reads none
    else:
        if spec.num_classes is None:
            raise ConfigError(
                f"model.name={cfg.name!r}: needs the number of classes, which your data does not "
                "say; return num_classes beside train and eval from your data factory"
            )
        model = importlib.import_module(MODELS[cfg.name]).build(cfg, spec)
    if cfg.activation_checkpointing:
        from launcher.models.checkpointing import checkpoint_blocks  # heavy: torch

        blocks = blocks_of(cfg, model)
        if not blocks:
            raise ConfigError(
                "model.activation_checkpointing=True: a model of your own needs "
                "model.checkpoint_blocks: the class names of the blocks to recompute (e.g. "
                f"[Block]); {type(model).__name__} declares none, as a Transformers model does "
                "in _no_split_modules"
            )
        checkpoint_blocks(model, blocks)
    return model


def blocks_of(cfg: ModelConfig, model: Any) -> tuple[type, ...]:
    """The model's block classes: what activation checkpointing recomputes as a whole and
    backend=fsdp shards as one unit (a built-in model's BLOCKS; yours: model.checkpoint_blocks,
    or where you name none, those a Transformers model declares in `_no_split_modules`, e.g.
    LlamaDecoderLayer)."""
    if isinstance(cfg, UserModelConfig):
        from launcher.models.outputs import default_blocks  # heavy: torch

        return _named_classes(model, cfg.checkpoint_blocks or default_blocks(model))
    return tuple(importlib.import_module(MODELS[cfg.name]).BLOCKS)


def _user_model(cfg: UserModelConfig, fresh: bool) -> Any:
    from torch import nn

    model = instantiate(cfg.target, cfg.kwargs, "model")
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model.{TARGET_KEY}={cfg.target!r}: returned a {type(model).__name__}, not a "
            "torch.nn.Module"
        )
    if fresh and is_provided_instance(model):
        return copy_into_context(model)
    return model


def _named_classes(model: Any, names: tuple[str, ...]) -> tuple[type, ...]:
    """The classes of `model`'s submodules that `names` name (ClassName or module.ClassName)."""
    if not names:
        return ()
    kinds = {type(m) for m in model.modules()}
    found = tuple(k for k in kinds if k.__name__ in names or _full_name(k) in names)
    if not found:
        mine = ", ".join(sorted({k.__name__ for k in kinds})[:12])
        raise ConfigError(
            f"model.checkpoint_blocks={list(names)}: no submodule has these classes; the "
            f"model's are {mine}"
        )
    return found


def _full_name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"
