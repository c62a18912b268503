"""`launcher.run(...)`: the plan and the loop from a Python script, with your own objects.

    import launcher
    result = launcher.run(["global_batch=512"], model=MyNet, data=make_data, loss=my_loss)

`model` is an nn.Module, or a callable that returns one (the class itself, a function); `data` is
what a data factory returns ((train, eval) datasets, a dict, an object with those attributes) or a
callable that returns it; `loss` is a callable(outputs, targets) -> one loss per sample. Each object
replaces its config group (model, data, loss) and is reached through the `_target_`
`launcher.api.provided`, so everything downstream is the path a config's `_target_` takes;
config.yaml records which object it was. A model instance is trained in place (the memory probe
measures copies of it); a factory is called for every fresh model the launcher needs.

Under torchrun, `accelerate launch`, the `deepspeed` CLI or srun every rank runs the script and
hands over its own objects. A mode whose workers are started as `python -m launcher` (a
`trainer.devices` > 1 spawn) could not rebuild them and is refused in one line; so is an override
of a group that an object replaced, and a sweep over one model instance.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence
from os import PathLike
from typing import Any

from launcher.config.checks import TARGET_KEY
from launcher.errors import ConfigError

PARTS = ("model", "data", "loss")
_PROVIDED: dict[str, Any] = {}
TARGET = "launcher.api.provided"


def describe(obj: Any) -> str:
    """What config.yaml records for a handed-over object: its class or function, by name."""
    if isinstance(obj, type) or callable(obj) and hasattr(obj, "__qualname__"):
        return f"{getattr(obj, '__module__', '?')}.{obj.__qualname__}"
    kind = type(obj)
    return f"{kind.__module__}.{kind.__qualname__} instance"


def _is_dataset(obj: Any) -> bool:
    return hasattr(obj, "__getitem__") or hasattr(obj, "__len__")


def provided(part: str, described: str) -> Any:
    """The object handed to launcher.run() for `part` (a factory is called here)."""
    if part not in _PROVIDED:
        raise ConfigError(
            f"{part}: {described} was handed to launcher.run() as a Python object; only the "
            "script that called it can rebuild it (a process started as `python -m launcher` "
            "cannot): run the script itself on every rank (torchrun, accelerate launch), or name "
            f"a factory with {part}.{TARGET_KEY} in a config dir"
        )
    obj = _PROVIDED[part]
    if _is_factory(part, obj):
        return obj()
    return obj


def _is_factory(part: str, obj: Any) -> bool:
    if part == "model":
        return not _is_module(obj)
    return part == "data" and callable(obj) and not _is_dataset(obj)


def source_of(part: str) -> Any:
    """The class or function whose source file defines a handed-over object (memory cache key)."""
    obj = _PROVIDED.get(part)
    return obj if _is_factory(part, obj) else type(obj)


def _is_module(obj: Any) -> bool:
    from torch import nn

    return isinstance(obj, nn.Module)


def is_provided_instance(module: Any) -> bool:
    """True for the model instance handed to launcher.run() (it is trained in place; fresh models
    for the memory probe are copies of it)."""
    return _PROVIDED.get("model") is module


def copy_into_context(module: Any) -> Any:
    """A copy of `module` as a model built here would be: in the current default device and dtype,
    or of fake tensors under an active FakeTensorMode (the plan_only estimate)."""
    import torch
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    fake = detect_fake_mode()
    if fake is None:
        return copy.deepcopy(module).to(torch.get_default_device(), torch.get_default_dtype())
    with unset_fake_temporarily():
        clone = copy.deepcopy(module).to(dtype=torch.get_default_dtype())
    keep = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        return clone._apply(fake.from_tensor)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(keep)


def _nodes(model: Any, data: Any, loss: Any) -> dict[str, dict[str, Any]]:
    nodes = {}
    for part, obj in zip(PARTS, (model, data, loss), strict=True):
        if obj is None:
            continue
        if part == "loss" and not callable(obj):
            raise ConfigError(f"loss={obj!r}: must be a callable(outputs, targets)")
        if part == "model" and not (callable(obj) or _is_module(obj)):
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
    from launcher.config.compose import user_config_dir
    from launcher.training.job import launch

    overrides = list(overrides)
    nodes = _nodes(model, data, loss)
    _check_overrides(overrides, nodes)
    if multirun and _is_module(model):
        raise ConfigError(
            "multirun: one model instance cannot start every job fresh; pass its class or a "
            "function that builds it"
        )
    folder = user_config_dir(str(config_dir)) if config_dir is not None else None
    _PROVIDED.clear()
    _PROVIDED.update(
        {p: o for p, o in zip(PARTS, (model, data, loss), strict=True) if o is not None}
    )
    _teardown_at_exit()
    _forget_data()  # data built for an earlier call (maybe from other objects of the same type)
    try:
        results = launch(overrides, multirun, folder, nodes)
    finally:
        _PROVIDED.clear()
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
    import atexit

    from launcher.backends import teardown

    atexit.unregister(teardown)
    atexit.register(teardown)
