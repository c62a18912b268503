"""Backends by name."""

from __future__ import annotations

import importlib
from typing import Any

from launcher.config import BackendConfig

BACKENDS = {"accelerate": "launcher.backends.accelerate:AccelerateBackend"}


def build_backend(cfg: BackendConfig, device: str) -> Any:
    module, _, cls = BACKENDS[cfg.name].partition(":")
    return getattr(importlib.import_module(module), cls)(cfg, device)
