"""A forged sharded checkpoint (backend=fsdp, torch.distributed.checkpoint) runs nothing
(launcher/checkpoint/shards.py): DCP itself reads a folder's `.metadata` with plain pickle and its
non-tensor values with torch.load(weights_only=False); the launcher reads both so that only data
is built, and only from the files the checkpoint lists."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from launcher.checkpoint.shards import Forged, SafePlanner, SafeReader, read_metadata
from tests.helpers import read_metrics, run_cli


class Payload:
    """What a forger pickles: unpickling it runs a shell command."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _save(folder, state) -> None:
    with warnings.catch_warnings():  # DCP notes that no process group is set up: one process
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=folder)


def _load(folder, state, **how) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, **how)


def _files(folder) -> list[str]:
    return [p.name for p in folder.iterdir()]


def test_real_metadata_reads_and_loads(tmp_path) -> None:
    state = {"w": torch.arange(6.0), "lr": 0.1, "groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]}
    _save(tmp_path / "ck", state)
    metadata = read_metadata((tmp_path / "ck" / ".metadata").read_bytes(), _files(tmp_path / "ck"))
    assert set(metadata.state_dict_metadata) >= {"w", "lr"}
    into = {"w": torch.zeros(6), "lr": 0.0, "groups": [{"lr": 0.0, "betas": (0.0, 0.0)}]}
    _load(
        tmp_path / "ck",
        into,
        storage_reader=SafeReader(tmp_path / "ck", _files(tmp_path / "ck")),
        planner=SafePlanner(),
    )
    assert torch.equal(into["w"], torch.arange(6.0)) and into["lr"] == 0.1
    assert into["groups"] == [{"lr": 0.1, "betas": (0.9, 0.99)}]


def test_forged_metadata_runs_nothing(tmp_path) -> None:
    marker = tmp_path / "ran"
    forged = pickle.dumps(Payload(marker))
    with pytest.raises(Forged, match="asks for posix.system"):
        read_metadata(forged, [".metadata"])
    assert not marker.exists()
    pickle.loads(forged)  # the control: this is what DCP's own reader does with the file
    assert marker.exists()


def test_metadata_pointing_outside_the_listed_files_is_refused(tmp_path) -> None:
    _save(tmp_path / "ck", {"w": torch.ones(3)})
    data = (tmp_path / "ck" / ".metadata").read_bytes()
    listed = [n for n in _files(tmp_path / "ck") if n != ".metadata"]
    read_metadata(data, listed)
    with pytest.raises(Forged, match="which the checkpoint does not list"):
        read_metadata(data, [])


def test_a_forged_value_in_a_shard_runs_nothing(tmp_path) -> None:
    """A non-tensor value whose bytes are a pickle that runs a command: DCP's default planner
    runs it; the launcher's refuses it."""
    marker = tmp_path / "ran"
    _save(tmp_path / "ck", {"w": torch.ones(2), "lr": Payload(marker)})
    into = {"w": torch.zeros(2), "lr": 0.0}
    reader = SafeReader(tmp_path / "ck", _files(tmp_path / "ck"))
    with pytest.raises(BaseException, match="its value lr is not plain data .*posix.system"):
        _load(tmp_path / "ck", into, storage_reader=reader, planner=SafePlanner())
    assert not marker.exists()
    _load(tmp_path / "ck", dict(into), checkpoint_id=tmp_path / "ck")  # the control
    assert marker.exists()


@pytest.mark.slow
def test_a_forged_fsdp_checkpoint_runs_nothing_on_resume(tmp_path, data_cache) -> None:
    """A run under backend=fsdp; its newest checkpoint forged as someone who can write the run
    folder would (the .metadata a command, the manifest's digest recomputed): the rerun says it is
    unusable in one line, resumes from the older one and runs nothing."""
    args = [
        "backend=fsdp",
        "data.num_samples=2000",
        f"data.cache_dir={data_cache}",
        "global_batch=64",
        "micro_batch=32",
        "memory.probe=false",
        "trainer.epochs=0.2",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        "trainer.log_every=1",
        "checkpoint.every_samples=64",
        "run_dir=run",
    ]
    first = run_cli(args, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    marker = tmp_path / "ran"
    forged = pickle.dumps(Payload(marker))
    (checkpoints / "step-000000005.dcp" / ".metadata").write_bytes(forged)
    state = torch.load(checkpoints / "step-000000005.pt", weights_only=True)
    state["shards"][".metadata"] = [len(forged), hashlib.sha256(forged).hexdigest()]
    torch.save(state, checkpoints / "step-000000005.pt")
    digest = hashlib.sha256((checkpoints / "step-000000005.pt").read_bytes()).hexdigest()
    (checkpoints / "step-000000005.sha256").write_text(digest + "\n")
    (tmp_path / "run" / "model_final.pt").unlink()  # as if killed before the end
    again = run_cli(args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not marker.exists()
    assert (
        f"launcher: checkpoint {checkpoints / 'step-000000005.pt'} is unusable (its metadata asks "
        "for posix.system, which a checkpoint never holds); trying an older one"
    ) in again.stderr
    assert f"resuming from {checkpoints / 'step-000000004.pt'}" in again.stdout
    steps = [m["step"] for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert steps == [1, 2, 3, 4, 5]
    shutil.rmtree(tmp_path / "run")
