"""Users' own components: import a `_target_`, check its keyword arguments, call it.

The call itself is Hydra's `instantiate` (nested `_target_` nodes, `_partial_`, `_args_`, and
Hydra's target policy, which refuses callables such as os.remove), with `_convert_: all`, so the
factory receives plain lists and dicts. Everything that can go wrong is said in one line naming the
key: a path that does not import (with the import error), a missing attribute, an unknown or
missing keyword argument (with the signature), a factory that raises (with its message;
HYDRA_FULL_ERROR=1 prints the traceback too), a package of one of the launcher's extras that is
not installed (with the pip command that installs it).
"""

from __future__ import annotations

import importlib
import inspect
import os
from typing import Any

from launcher.config.checks import TARGET_KEY
from launcher.errors import ConfigError

HYDRA_KEYS = ("_args_", "_partial_", "_convert_", "_recursive_")
PRETRAINED = "pretrained_model_name_or_path"  # Transformers' from_pretrained: a folder or Hub id
# Packages a config may name that the core install does not bring: the extra that does
EXTRAS = {"transformers": "hf", "datasets": "hf", "tokenizers": "hf", "torchdata": "hf"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _missing_extra(exc: BaseException | None, where: str) -> ConfigError | None:
    """The one line for an import that failed because a package of an extra is not installed,
    whether the target names it, or the user's module, factory or a nested target imports it
    (Hydra wraps that ModuleNotFoundError in an ImportError: the chain of causes is searched)."""
    for _ in range(4):
        if exc is None:
            return None
        if isinstance(exc, ModuleNotFoundError):
            return _needs(exc.name, where)
        exc = exc.__cause__
    return None


def _needs(package: str | None, where: str) -> ConfigError | None:
    """Not installed: `package`, when it is one of the extras' (else None: another fault)."""
    if package not in EXTRAS:  # a submodule missing from an installed package is another fault
        return None
    return ConfigError(
        f"{where}: needs {package}, which is not installed: "
        f"pip install 'globalbatch[{EXTRAS[package]}]'"
    )


def locate(target: str, key: str) -> Any:
    """The callable a `_target_` path names; ConfigError if it does not import or is no callable."""
    parts = target.split(".")
    where = f"{key}.{TARGET_KEY}={target!r}"
    missing = None  # the longest prefix that is no module
    top = None  # the shortest: after the loop, parts[0] (not importable at all)
    for i in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module_name)
            break
        except ModuleNotFoundError as exc:
            if exc.name is not None and f"{module_name}.".startswith(f"{exc.name}."):
                missing, top = missing or exc.name, exc.name
                continue  # this prefix is not a module: try a shorter one
            raise _missing_extra(exc, where) or ConfigError(
                f"{where}: importing {module_name} failed: {_first_line(exc)}"
            ) from exc
        except Exception as exc:  # the user's module raised while it was imported
            raise ConfigError(
                f"{where}: importing {module_name} raised {_first_line(exc)}"
            ) from exc
    else:
        raise _needs(top, where) or ConfigError(
            f"{where}: no module named {parts[0]!r} on the Python path (run from the folder that "
            "holds it, add that folder to PYTHONPATH, or pip install your package)"
        )
    for attr in parts[i:]:
        if not hasattr(obj, attr):
            if missing is not None:
                raise ConfigError(f"{where}: no module named {missing!r}")
            raise ConfigError(f"{where}: {obj.__name__} has no attribute {attr!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ConfigError(f"{where}: {type(obj).__name__} is not callable")
    return obj


def check_arguments(fn: Any, kwargs: dict[str, Any], key: str, target: str) -> None:
    """Refuse keyword arguments the factory does not take, and missing required ones."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none: the call itself will tell
        return
    own = {k: v for k, v in kwargs.items() if k not in HYDRA_KEYS}
    params = signature.parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        named = {p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
        for name, value in own.items():
            if name not in named:
                raise ConfigError(
                    f"{key}.{name}={value!r}: not a keyword argument of {target}{signature}"
                )
    bind = signature.bind_partial if kwargs.get("_partial_") else signature.bind
    try:
        bind(*kwargs.get("_args_", ()), **own)
    except TypeError as exc:
        raise ConfigError(f"{key}.{TARGET_KEY}={target!r}: {target}{signature}: {exc}") from None


def instantiate(target: str, kwargs: dict[str, Any], key: str) -> Any:
    """Call the factory `target` with `kwargs` (Hydra's instantiate); errors in one line."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    fn = locate(target, key)
    check_arguments(fn, kwargs, key, target)
    pretrained = _pretrained_folder(target, kwargs, key)
    node = {TARGET_KEY: target, "_convert_": "all", **kwargs}
    try:
        return hydra_instantiate(node)
    except InstantiationException as exc:
        cause = exc.__cause__
        if cause is None:  # refused by Hydra itself (its target policy, a nested target)
            raise ConfigError(f"{key}.{TARGET_KEY}={target!r}: {_first_line(exc)}") from None
        if isinstance(cause, ConfigError):  # e.g. launcher.api.provided
            raise cause from None
        extra = _missing_extra(cause, f"{key}.{TARGET_KEY}={target!r}")
        if extra is not None:  # the factory imports it inside
            raise extra from cause
        if pretrained is not None and isinstance(cause, OSError):
            raise ConfigError(
                f"{pretrained}: not a local folder, and Transformers could not load it as a Hub "
                f"model id ({_first_line(cause)})"
            ) from cause
        raise ConfigError(f"{key}.{TARGET_KEY}={target!r} raised {_first_line(cause)}") from cause


def _pretrained_folder(target: str, kwargs: dict[str, Any], key: str) -> str | None:
    """For a Transformers `from_pretrained` whose folder or Hub id is not a folder here: its
    KEY=VALUE (else None). One that reads as a path (absolute, or starting with . or ~) and is no
    folder is refused before the call, which would otherwise take it for a Hub id and fail
    obscurely (or try the network)."""
    if not target.endswith(".from_pretrained"):
        return None
    if PRETRAINED in kwargs:
        name, value = PRETRAINED, kwargs[PRETRAINED]
    elif kwargs.get("_args_"):
        name, value = "_args_[0]", kwargs["_args_"][0]
    else:
        return None
    if not isinstance(value, (str, os.PathLike)) or os.path.isdir(value):
        return None
    where = f"{key}.{name}={os.fspath(value)!r}"
    if os.path.isabs(value) or os.fspath(value).startswith((".", "~")):
        raise ConfigError(
            f"{where}: no such folder ({target} loads a folder written by save_pretrained)"
        )
    return where
