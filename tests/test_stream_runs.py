"""Whole runs on a user's stream (tests/stream_project.py: variable-length token sequences in
dict batches, its own padding collate, 2 DataLoader workers per rank; issue 31): every sample is
trained on exactly once per pass over 2 ranks x 2 workers; a run killed with SIGKILL and rerun
ends bit-identical; one continued on another world size trains on the same samples after its
checkpoint."""

from __future__ import annotations

import collections
import random
from pathlib import Path

import pytest
import torch

from tests.helpers import read_metrics, run_cli
from tests.stream_project import write_project

N, EVAL, FIRST_EVAL = 192, 40, 10_000  # the project's stream sizes and its eval ids' start


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("streamproj")
    write_project(root)
    return root


def _run(
    project: Path, cwd: Path, extra: list[str], kill: str = "", two: bool = False, oom: str = ""
):
    seen = cwd / f"seen-{len(list(cwd.glob('seen-*')))}"
    seen.mkdir(parents=True)
    env = {"STREAMPROJ_SEEN": str(seen), "PYTHONPATH": str(project)}
    if kill:
        env["LAUNCHER_TEST_KILL"] = kill
    if oom:
        env["LAUNCHER_TEST_OOM"] = oom
    args = ["--config-dir", str(project / "conf"), "+recipe=streamed", "run_dir=run", *extra]
    if two:
        args.append("trainer.devices=2")
    return run_cli(args, cwd, env=env), seen


def _counts(seen: Path) -> collections.Counter:
    return collections.Counter(
        int(line) for f in seen.glob("*.txt") for line in f.read_text().split()
    )


def _losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run) if "loss" in m}


def _params(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model_final.pt", weights_only=True)


@pytest.fixture(scope="module")
def two_ranks(project, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("two")
    res, seen = _run(project, cwd, [], two=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return cwd / "run", seen, res.stdout


@pytest.mark.slow
def test_two_ranks_with_two_workers_train_on_every_sample_once_per_pass(two_ranks):
    run, seen, out = two_ranks
    counts = _counts(seen)
    assert {i: counts[i] for i in range(N)} == dict.fromkeys(range(N), 2)  # 2 epochs
    evals = [m for m in read_metrics(run) if "eval_loss" in m]
    assert {i: counts[i] for i in range(FIRST_EVAL, FIRST_EVAL + EVAL)} == dict.fromkeys(
        range(FIRST_EVAL, FIRST_EVAL + EVAL), len(evals)
    )
    assert all(e["eval_samples"] == EVAL for e in evals)
    assert set(counts) == set(range(N)) | set(range(FIRST_EVAL, FIRST_EVAL + EVAL))
    assert "data                stream  a stream in its own order: each of 4 reader(s)" in out
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 25))
    assert losses[24] < 0.6 * losses[1], losses  # it learned
    waits = [m["data_wait"] for m in read_metrics(run) if "data_wait" in m]
    assert len(waits) == 24 and all(0 <= w <= 1 for w in waits)  # the loop's wait on data


@pytest.mark.slow
def test_killed_at_a_random_step_then_rerun_ends_bit_identical(project, tmp_path):
    whole, _ = _run(project, tmp_path / "whole", [])
    assert whole.returncode == 0, whole.stderr[-3000:]
    step = random.Random(31).randint(3, 20)
    cut = tmp_path / "cut"
    killed, _ = _run(project, cut, [], kill=f"{step}:step")
    assert killed.returncode == -9, killed.stderr[-2000:]
    done, _ = _run(project, cut, [])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "launcher: resuming from" in done.stdout
    ref, got = _params(tmp_path / "whole" / "run"), _params(cut / "run")
    for name, value in ref.items():
        assert torch.equal(got[name], value), name
    assert _losses(cut / "run") == _losses(tmp_path / "whole" / "run")


@pytest.mark.slow
def test_resumed_on_one_rank_it_trains_on_the_same_samples_after_the_checkpoint(
    project, two_ranks, tmp_path
):
    """Killed on 2 ranks after step 5 (the last save: step 4, 64 samples), continued on 1: its
    loader trains on stream positions 64..383 exactly (ids 0..63 once, the rest twice), and each
    step's loss is the 2-rank run's (1e-5: the reduction order differs)."""
    killed, _ = _run(project, tmp_path, [], kill="5:step", two=True)
    assert killed.returncode != 0
    done, seen = _run(project, tmp_path, [])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "launcher: resuming from" in done.stdout
    counts = _counts(seen)
    assert {i: counts[i] for i in range(N)} == {i: 1 if i < 64 else 2 for i in range(N)}
    ref, got = _losses(two_ranks[0]), _losses(tmp_path / "run")
    assert sorted(got) == list(range(1, 25))
    for step in range(5, 25):
        assert abs(got[step] - ref[step]) <= 1e-5 * abs(ref[step]), (step, got[step], ref[step])


@pytest.mark.slow
def test_a_stream_that_differs_between_ranks_is_refused_after_the_first_step(project, tmp_path):
    res, _ = _run(project, tmp_path, ["+data.by_rank=true"], two=True)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "launcher: error: data: the training stream differs between ranks at sample 16 " in (
        res.stderr
    )
    assert not (tmp_path / "run" / "checkpoints").exists() or not list(
        (tmp_path / "run" / "checkpoints").glob("*.pt")
    )


LLAMA = [
    "data=documents",
    "model=llama",
    "global_batch_tokens=128",
    "backend=fsdp",
    "micro_batch=auto",
]
LLAMA.append("model.activation_checkpointing=true")


@pytest.mark.slow
def test_a_transformers_llama_on_packed_documents_under_fsdp2_on_two_ranks(project, tmp_path):
    """A LlamaForCausalLM built from its config, packed documents (global_batch_tokens), FSDP2
    sharding its LlamaDecoderLayers on 2 ranks with activation checkpointing: a ramp-up in
    tokens and an injected out-of-memory error on rank 1 go through, the loss falls; killed
    after step 10 and rerun, a run without them ends bit-identical to one never interrupted
    (1 epoch of 16 steps: the kill and the resume need no more)."""
    pytest.importorskip("transformers")
    env_oom = tmp_path / "oom"
    ramp = ["ramp.start_batch_tokens=32", "ramp.tokens=512"]
    res, _ = _run(project, env_oom, [*LLAMA, *ramp, "trainer.epochs=3"], two=True, oom="1:6:4")
    assert res.returncode == 0, res.stderr[-3000:]
    records = read_metrics(env_oom / "run")
    events = collections.Counter(r.get("event") for r in records)
    assert events["out_of_memory"] == 1 and events["ramp"] == 2, events
    losses = _losses(env_oom / "run")
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert losses[max(losses)] < 0.3 * losses[1] and evals[-1] < 0.1, (losses, evals)

    short = [*LLAMA, "trainer.epochs=1"]
    whole, _ = _run(project, tmp_path / "whole", short, two=True)
    assert whole.returncode == 0, whole.stderr[-3000:]
    cut = tmp_path / "cut"
    killed, _ = _run(project, cut, short, kill="10:step", two=True)
    assert killed.returncode != 0
    done, _ = _run(project, cut, short, two=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "launcher: resuming from" in done.stdout
    ref, got = _params(tmp_path / "whole" / "run"), _params(cut / "run")
    for name, value in ref.items():
        assert torch.equal(got[name], value), name
