"""launcher: a batch-size-aware distributed training launcher for PyTorch.

    python -m launcher [--config-dir DIR] [+recipe=NAME] [key=value ...]
    launcher.run([key=value ...], model=..., data=..., loss=...)      # from a script

Importing the package imports nothing heavy (no torch, no numpy); `run` loads the rest when
called.
"""

from __future__ import annotations

from typing import Any

from launcher.cluster.preemption import Stopped
from launcher.errors import ConfigError

__version__ = "0.1.0"
__all__ = ["ConfigError", "Stopped", "run"]


def run(*args: Any, **kwargs: Any) -> Any:
    """Plan and train from Python; see launcher.api.run."""
    from launcher.api import run as api_run  # heavy: numpy

    return api_run(*args, **kwargs)
