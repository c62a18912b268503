"""The objects handed to `launcher.run(model=, data=, loss=)`, held for the run that uses them.

launcher/api.py holds them here for one call and replaces their config groups with nodes whose
`_target_` is TARGET; building the model, the data or the loss then reaches `provided`, the path
any `_target_` takes. The model and the memory probe read here too: which object the script gave
(`is_provided_instance`, `source_of`) and a copy of a model instance (`copy_into_context`).

Nothing here imports torch at the top: `import launcher` stays light.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from launcher.errors import ConfigError

PARTS = ("model", "data", "loss")
# What config.yaml and every checkpoint's config record as these nodes' `_target_` (launcher.api
# binds `provided` under that name). Kept as written since launcher.run() began: resuming a run
# compares its saved config with the new one, key by key, so another string would refuse every
# run folder written before.
TARGET = "launcher.api.provided"
_PROVIDED: dict[str, Any] = {}


def hold(objects: Mapping[str, Any]) -> None:
    """The objects of one launcher.run() call, by part (model, data, loss), in place of any
    earlier call's."""
    _PROVIDED.clear()
    _PROVIDED.update(objects)


def release() -> None:
    """Forget the objects once their run is over."""
    _PROVIDED.clear()


def describe(obj: Any) -> str:
    """What config.yaml records for a handed-over object: its class or function, by name."""
    if isinstance(obj, type) or callable(obj) and hasattr(obj, "__qualname__"):
        return f"{getattr(obj, '__module__', '?')}.{obj.__qualname__}"
    kind = type(obj)
    return f"{kind.__module__}.{kind.__qualname__} instance"


def provided(part: str, described: str) -> Any:
    """The object handed to launcher.run() for `part` (a factory is called here)."""
    if part not in _PROVIDED:
        raise ConfigError(
            f"{part}: {described} was handed to launcher.run() as a Python object; only the "
            "script that called it can rebuild it (a process started as `python -m launcher` "
            "cannot): run the script itself on every rank (torchrun, accelerate launch), or name "
            f"a factory with {part}._target_ in a config dir"
        )
    obj = _PROVIDED[part]
    if _is_factory(part, obj):
        return obj()
    return obj


def source_of(part: str) -> Any:
    """The class or function whose source file defines a handed-over object (memory cache key)."""
    obj = _PROVIDED.get(part)
    return obj if _is_factory(part, obj) else type(obj)


def is_module(obj: Any) -> bool:
    """An nn.Module (torch is imported only when asked)."""
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


def _is_dataset(obj: Any) -> bool:
    return hasattr(obj, "__getitem__") or hasattr(obj, "__len__")


def _is_factory(part: str, obj: Any) -> bool:
    if part == "model":
        return not is_module(obj)
    return part == "data" and callable(obj) and not _is_dataset(obj)
