"""`launcher.run(...)`: the plan and the loop from a Python script, with your own objects.

    import launcher
    result = launcher.run(["global_batch=512"], model=MyNet, data=make_data, loss=my_loss)

`model` is an nn.Module, or a callable that returns one (the class itself, a function); `data` is
what a data factory returns ((train, eval) datasets, a dict, an object with those attributes) or a
callable that returns it; `loss` is a callable(outputs, targets) -> one loss per sample. Each object
replaces its config group (model, data, loss) and is reached through the `_target_`
`launcher.api.provided` (held in launcher/types/provided.py, which the model and the memory probe
read), so everything downstream is the path a config's `_target_` takes; config.yaml records
which object it was. A model instance is trained in place (the memory probe
measures copies of it); a factory is called for every fresh model the launcher needs.

Under torchrun, `accelerate launch`, the `deepspeed` CLI or srun every rank runs the script and
hands over its own objects. A mode whose workers are started as `python -m launcher` (a
`trainer.devices` > 1 spawn) could not rebuild them and is refused in one line; so is an override
of a group that an object replaced, and a sweep over one model instance.
"""

from __future__ import annotations

import atexit
import sys
from collections.abc import Sequence
from os import PathLike
from typing import Any

from launcher.backends import teardown
from launcher.config.checks import TARGET_KEY
from launcher.config.compose import user_config_dir
from launcher.errors import ConfigError
from launcher.training.job import launch
from launcher.types.provided import PARTS, TARGET, describe, hold, is_module, release
from launcher.types.provided import provided as provided  # what TARGET, the _target_, names


def _nodes(model: Any, data: Any, loss: Any) -> dict[str, dict[str, Any]]:
    nodes = {}
    for part, obj in zip(PARTS, (model, data, loss), strict=True):
        if obj is None:
            continue
        if part == "loss" and not callable(obj):
            raise ConfigError(f"loss={obj!r}: must be a callable(outputs, targets)")
        if part == "model" and not (callable(obj) or is_module(obj)):
            raise ConfigError(
                f"model={obj!r}: must be a torch.nn.Module or a callable that returns one"
            )
        nodes[part] = {TARGET_KEY: TARGET, "part": part, "described": describe(obj)}
    return nodes


def _check_overrides(overrides: list[str], nodes: dict[str, Any]) -> None:
    for item in overrides:
        key = item.partition("=")[0].lstrip("+~")
        group = key.split(".")[0].split("@")[0]
        if group in nodes:
            raise ConfigError(
                f"{item!r}: the {group} was handed to launcher.run() as a Python object; "
                "configure it in your script"
            )


def run(
    overrides: Sequence[str] = (),
    *,
    model: Any = None,
    data: Any = None,
    loss: Any = None,
    config_dir: str | PathLike[str] | None = None,
    multirun: bool = False,
) -> dict[str, Any] | list[dict[str, Any]]:
    """Compose the config (the packaged one, `config_dir` like --config-dir, `overrides` like the
    command line), plan, and train, with `model`, `data` and `loss` in place of their groups.
    Returns the final evaluation with `run_dir` (one dict per job when `multirun`; an empty one
    when this process only started `trainer.devices` workers, allowed without objects). Bad input
    raises launcher.ConfigError; a run stopped by SIGUSR1/SIGTERM raises launcher.Stopped."""
    overrides = list(overrides)
    nodes = _nodes(model, data, loss)
    _check_overrides(overrides, nodes)
    if multirun and is_module(model):
        raise ConfigError(
            "multirun: one model instance cannot start every job fresh; pass its class or a "
            "function that builds it"
        )
    folder = user_config_dir(str(config_dir)) if config_dir is not None else None
    hold({p: o for p, o in zip(PARTS, (model, data, loss), strict=True) if o is not None})
    _teardown_at_exit()
    _forget_data()  # data built for an earlier call (maybe from other objects of the same type)
    try:
        results = launch(overrides, multirun, folder, nodes)
    finally:
        release()
        _forget_data()
    if multirun:
        return results
    return results[0] if results else {}  # workers started here (trainer.devices) ran the job


def _forget_data() -> None:
    user_data = sys.modules.get("launcher.data.user")
    if user_data is not None:
        user_data.release()


def _teardown_at_exit() -> None:
    """The process group (made by the first run) is ended when the script exits, as the command
    line ends it after its last job: a script may train several runs in one group."""
    atexit.unregister(teardown)
    atexit.register(teardown)
