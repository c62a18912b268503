"""Reading a sharded checkpoint (backend=fsdp) without running its code.

torch.distributed.checkpoint (torch 2.14) reads a checkpoint folder's `.metadata` with plain
`pickle.load` and its non-tensor values (the optimizer's param_groups) with
`torch.load(weights_only=False)`: a forged folder runs whatever it pickled, and the folder's
manifest is no defence, since whoever can write the folder can recompute its digests. Here the
metadata goes through an unpickler that builds only the checkpoint format's own classes
(`ALLOWED`: DCP's metadata dataclasses, torch.Size, dtypes, layouts, paths), the values through
`torch.load(weights_only=True)`, and every file the metadata points at must be one the manifest
lists (a plain name inside the folder, digest-checked by checkpoint/files.py before this runs).
The shard files' tensors are read by DCP with `weights_only=True` already.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterable
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from launcher.errors import ConfigError

METADATA = ".metadata"  # DCP's name for a checkpoint's metadata file
ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a lookup in torch's own table of layouts
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}


class Forged(ValueError):
    """The metadata names something a checkpoint's metadata never holds."""


class Unsafe(ConfigError):
    """A sharded checkpoint that cannot be loaded without running what it holds."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise Forged(f"its metadata asks for {module}.{name}, which a checkpoint never holds")


def read_metadata(data: bytes, files: Iterable[str]) -> Metadata:
    """The checkpoint metadata in `data`, built from the allowed classes only, whose storage
    points at none but `files` (the manifest's names)."""
    metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    if not isinstance(metadata, Metadata):
        raise Forged(f"its metadata is a {type(metadata).__name__}, not checkpoint metadata")
    allowed = set(files)
    for info in (metadata.storage_data or {}).values():
        where = getattr(info, "relative_path", None)
        if where not in allowed:
            raise Forged(f"its metadata points at {where!r}, which the checkpoint does not list")
    return metadata


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata is read by `read_metadata`."""

    def __init__(self, path: Any, files: Iterable[str]) -> None:
        super().__init__(path)
        self.files = set(files)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = read_metadata(stream.read(), self.files)
        storage = getattr(metadata, "storage_meta", None)
        if storage is None:  # as FileSystemReader does
            storage = metadata.storage_meta = StorageMeta()
        storage.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor values must load with `weights_only=True` first: then
    its own load of the same bytes builds nothing but plain data."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:  # torch's message: many lines, one of them says
            lines = [ln for ln in str(exc).splitlines() if "GLOBAL" in ln] or ["not plain data"]
            fqn = read_item.dest_index.fqn
            raise Forged(f"its value {fqn} is not plain data ({lines[0].strip()})") from None
        value.seek(0)
        super().load_bytes(read_item, value)
