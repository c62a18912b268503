"""The schema's defaults as Hydra config nodes: the one source of every default.

The conf/ YAML files hold only what a group option changes. Each option extends its group's node
from here (`defaults: [/schema/<group>@_here_]`, or `/schema/<group>/<option>@_here_` for a group
of several kinds: model, data, backend, loss), and config.yaml starts from `schema_run`: the
top-level keys and the memory, checkpoint, ramp and slurm sections. Hydra needs every key in the
composed config to override it without `+`, so the defaults are stored, not just applied by the
dataclasses; `--cfg job` shows them all.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from launcher.config.checks import Target
from launcher.config.schema import RunConfig

SCHEMA_GROUP = "schema"
RUN_NODE = "schema_run"


def field_defaults(cls: type) -> dict[str, Any]:
    """The fields of dataclass `cls` that have a default, as plain YAML-able values (tuples as
    lists, a nested dataclass as its own defaults)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        factory = f.default_factory
        if f.default is not dataclasses.MISSING:
            out[f.name] = plain(f.default)
        elif isinstance(factory, type) and dataclasses.is_dataclass(factory):
            out[f.name] = field_defaults(factory)  # a section: memory, checkpoint, ...
        elif factory is not dataclasses.MISSING:
            out[f.name] = plain(factory())
    return out


def plain(value: Any) -> Any:
    """`value` as YAML-able data: tuples as lists, a dataclass as its fields."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def option_name(cls: type) -> str | None:
    """The option a dataclass of a group union is chosen by (its `name` Literal), if one."""
    hint = typing.get_type_hints(cls).get("name")
    if typing.get_origin(hint) is Literal and len(typing.get_args(hint)) == 1:
        return str(typing.get_args(hint)[0])
    return None


def nodes() -> dict[str, dict[str, Any]]:
    """{config path: node}: `schema/<group>` for a group of one dataclass, `schema/<group>/<name>`
    for each kind of a union group, and `schema_run` for the top level."""
    out: dict[str, dict[str, Any]] = {}
    hints = typing.get_type_hints(RunConfig)
    top = field_defaults(RunConfig)
    run: dict[str, Any] = {}
    for f in dataclasses.fields(RunConfig):
        hint = hints[f.name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        options = typing.get_args(hint) if union else ()
        kinds = [o for o in options if isinstance(o, type) and dataclasses.is_dataclass(o)]
        if kinds:  # a group of several kinds: model, data, backend, loss
            for cls in kinds:
                name = option_name(cls)
                if name is not None and not issubclass(cls, Target):
                    out[f"{SCHEMA_GROUP}/{f.name}/{name}"] = field_defaults(cls)
        elif (
            isinstance(hint, type)
            and dataclasses.is_dataclass(hint)
            and f.default_factory is dataclasses.MISSING
        ):
            out[f"{SCHEMA_GROUP}/{f.name}"] = field_defaults(hint)  # a group: optim, trainer, ...
        elif f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            run[f.name] = top[f.name]
    out[RUN_NODE] = run
    return out


_stored: dict[str, dict[str, Any]] = {}


def register() -> None:
    """Store the nodes in Hydra's ConfigStore (before composing; joblib and submitit jobs get
    the store with the job)."""
    from hydra.core.config_store import ConfigStore

    current = nodes()
    if current == _stored:  # once per process (the store outlives each composition)
        return
    store = ConfigStore.instance()
    for path, node in current.items():
        group, _, name = path.rpartition("/")
        store.store(group=group or None, name=name, node=node)
    _stored.clear()
    _stored.update(current)
