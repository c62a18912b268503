"""Checkpoint files that are not what they seem (launcher/checkpoint/files.py, resume.py): a FIFO
or a link to a device where a checkpoint should be is passed over without blocking or reading
without end; a `latest` pointer that is not UTF-8 or names another file is ignored with a line;
a checkpoint whose digest matches but whose contents are not a launcher checkpoint's (forged) is
refused in one line, never a traceback."""

from __future__ import annotations

import hashlib
import os
import signal
import typing

import pytest
import torch

from launcher.checkpoint import files as checkpoint
from launcher.checkpoint.resume import CONFIG_HOLDS, HOLDS, PLAN_HOLDS, check_state, find
from launcher.errors import ConfigError
from launcher.types.state import CheckpointState, SavedConfig, SavedPlan


def _state(step: int) -> dict:
    return {
        "format": 1,
        "step": step,
        "consumed_samples": 64 * step,
        "global_batch": 64,
        "world_size": 1,
        "model": {"w": torch.ones(2)},
        "optimizer": {},
        "rng": [{}],
        "plan": {
            "origin_step": 0,
            "origin_samples": 0,
            "optimizer": "sgd",
            "epoch_samples": 640,
            "total_samples": 640,
        },
        "config": {
            **{g: {} for g in ("model", "data", "optim", "schedule", "trainer", "checkpoint")},
            "seed": 0,
        },
        "progress": {},
    }


@pytest.fixture
def run(tmp_path):
    """A run folder with valid checkpoints of steps 1 and 2."""
    (tmp_path / "run").mkdir()
    for step in (1, 2):
        checkpoint.save(tmp_path / "run", step, _state(step), keep=5)
    return tmp_path / "run"


@pytest.fixture(autouse=True)
def no_hang():
    """A test that blocks fails after 20 s instead of hanging the suite."""

    def fail(signum, frame):
        raise TimeoutError("blocked reading a checkpoint")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _newest(run, make) -> None:
    """Step 3's checkpoint made by `make(path)`, with a sidecar, and `latest` naming it."""
    path = run / "checkpoints" / "step-000000003.pt"
    make(path)
    (run / "checkpoints" / "step-000000003.sha256").write_text("0" * 64 + "\n")
    (run / "checkpoints" / "latest").write_text(path.name + "\n")


@pytest.mark.parametrize(
    "make",
    [lambda p: os.mkfifo(p), lambda p: os.symlink("/dev/zero", p)],
    ids=["fifo", "link-to-dev-zero"],
)
def test_a_checkpoint_that_is_no_regular_file_is_passed_over(run, make) -> None:
    _newest(run, make)
    said: list[str] = []
    state, path = find("auto", run, said.append)
    assert state["step"] == 2
    assert said == [
        f"launcher: checkpoint {run}/checkpoints/step-000000003.pt is unusable (not a regular "
        "file); trying an older one"
    ]
    with pytest.raises(ConfigError, match="no usable checkpoint there"):
        find(str(run / "checkpoints" / "step-000000003.pt"), run, said.append)


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"\xff\xfe\x00step\n", "is unreadable (not UTF-8 text)"),
        (b"../../../etc/passwd\n", "names '../../../etc/passwd', not a checkpoint"),
        (b"x" * 10_000, "is unreadable (latest is longer than 4096 bytes)"),
    ],
)
def test_a_latest_pointer_that_makes_no_sense_is_ignored_with_a_line(run, content, why) -> None:
    (run / "checkpoints" / "latest").write_bytes(content)
    said: list[str] = []
    state, _ = find("auto", run, said.append)
    assert state["step"] == 2
    assert said == [f"launcher: {run}/checkpoints/latest {why}; looking at every checkpoint"]


def _forge(run, state) -> None:
    """Step 3's checkpoint holding `state`, its digest recomputed (as a forger would)."""
    path = run / "checkpoints" / "step-000000003.pt"
    torch.save(state, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (run / "checkpoints" / "step-000000003.sha256").write_text(digest + "\n")
    (run / "checkpoints" / "latest").write_text(path.name + "\n")


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"step": "3"}, "step is not an integer"),
        ({"step": True}, "step is not an integer"),
        ({"config": []}, "config is not a mapping"),
        ({"plan": {"origin_step": 0}}, "plan.origin_samples is not an integer"),
        ({"rng": []}, "one RNG state per rank expected"),
        ({"consumed_samples": -64}, "a negative count"),
        ({"shards": {"../x": [1, "d"]}}, "its shard manifest is malformed"),
        ({"shards": {".metadata": [1, "d"]}}, "its shard .* is missing"),
    ],
)
def test_a_forged_checkpoint_is_refused_in_one_line(run, change, why) -> None:
    _forge(run, _state(3) | change)
    said: list[str] = []
    state, _ = find("auto", run, said.append)
    assert state["step"] == 2 and len(said) == 1
    assert said[0].startswith(
        f"launcher: checkpoint {run}/checkpoints/step-000000003.pt is unusable"
    )
    with pytest.raises(ConfigError, match=why):
        find(str(run / "checkpoints" / "step-000000003.pt"), run, said.append)


def test_a_real_checkpoint_passes_the_shape_check(run) -> None:
    check_state(checkpoint.load(run, print)[0])


@pytest.mark.parametrize(
    "typed, holds, unread",
    [
        (CheckpointState, HOLDS, {"format"}),
        (SavedPlan, PLAN_HOLDS, set()),
        (SavedConfig, CONFIG_HOLDS, set()),
    ],
    ids=["state", "plan", "config"],
)
def test_the_shape_check_is_the_typed_state(typed, holds, unread) -> None:
    """check_state holds a loaded file to launcher/types/state.py: each required key (but the
    format number, which nothing reads yet) of the kind its type says."""
    hints = typing.get_type_hints(typed, localns={"Tensor": torch.Tensor})
    assert set(holds) == typed.__required_keys__ - unread
    for key, kind in holds.items():
        hint = hints[key]
        assert (dict if typing.is_typeddict(hint) else typing.get_origin(hint) or hint) is kind
