"""Checkpoints and resume: atomic files, fallback past corruption, exact and elastic resume.

Stated tolerances: resuming on the same world size is bit-exact on CPU (same summation order,
RNG states restored). Resuming on another world size changes only the summation order of the
gradient reduction: parameters within 1e-5 absolute (float32) of the uninterrupted run, every
logged loss within 1e-5 relative.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

from launcher.checkpoint import files as checkpoint
from launcher.cli import main
from tests.helpers import SMALL_DATA, read_metrics, run_cli, torchrun, train_here

ARGS = [
    *SMALL_DATA,
    "global_batch=64",
    "micro_batch=16",
    "trainer.epochs=0.4",  # 0.4 x 1,600 / 64 = 10 steps
    "trainer.progress=false",
    "trainer.tensorboard=false",
    "trainer.log_every=1",
    "memory.probe=false",
    "checkpoint.every_samples=128",  # every 2 steps
    "checkpoint.keep=3",
]


def two() -> list[str]:
    """torchrun for 2 processes, on a port free now."""
    return [sys.executable, *torchrun()]


def _state(i: int) -> dict:
    return {"consumed_samples": i, "w": torch.full((3,), float(i))}


def test_save_keeps_the_newest_and_points_latest_at_the_last(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint.save(tmp_path, step, _state(step), keep=2)
    names = sorted(p.name for p in checkpoint.folder(tmp_path).iterdir())
    assert names == [
        "latest",
        "step-000000003.pt",
        "step-000000003.sha256",
        "step-000000004.pt",
        "step-000000004.sha256",
    ]
    assert (checkpoint.folder(tmp_path) / "latest").read_text() == "step-000000004.pt\n"
    state, path = checkpoint.load(tmp_path, print)
    assert state["consumed_samples"] == 4 and path.name == "step-000000004.pt"


@pytest.mark.parametrize("damage", ["truncate", "flip", "missing", "pickle"])
def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(damage, tmp_path):
    for step in (1, 2):
        checkpoint.save(tmp_path, step, _state(step), keep=3)
    newest = checkpoint.folder(tmp_path) / "step-000000002.pt"
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        newest.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "missing":
        newest.unlink()
    else:  # a file that would run code when unpickled, with a matching digest
        torch.save({"consumed_samples": 9, "f": print}, newest)
        digest = checkpoint._digest(newest)
        newest.with_suffix(".sha256").write_text(digest + "\n")
    warnings: list[str] = []
    state, path = checkpoint.load(tmp_path, warnings.append)
    assert state["consumed_samples"] == 1 and path.name == "step-000000001.pt"
    assert len(warnings) == 1 and "step-000000002.pt is unusable" in warnings[0]  # `latest`


def _params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model_final.pt", weights_only=True)


def _losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_cache) -> Path:
    cwd = tmp_path_factory.mktemp("whole")
    res = train_here([*ARGS, f"data.cache_dir={data_cache}", "run_dir=run"], cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    return cwd / "run"


@pytest.mark.slow
def test_killed_at_random_points_then_rerun_ends_bit_identical(uninterrupted, tmp_path, data_cache):
    """SIGKILL (kill -9) after a step, while a checkpoint is half written and between its rename
    and the `latest` update; each time the same command continues and the final parameters are
    bit-identical to a run that was never interrupted. (The last run in this process.)"""
    rng = random.Random(4)
    points = [f"{rng.choice([3, 4, 5])}:step", f"{rng.choice([6, 8])}:written", "10:renamed"]
    cmd = [*ARGS, f"data.cache_dir={data_cache}", "run_dir=run"]
    for point in points:
        killed = run_cli(cmd, tmp_path, env={"LAUNCHER_TEST_KILL": point})
        assert killed.returncode == -9, (point, killed.stderr[-2000:])
        latest = (checkpoint.folder(tmp_path / "run") / "latest").read_text().strip()
        state, path = checkpoint.load(tmp_path / "run", pytest.fail)  # never a corrupt latest
        assert path.name == latest
    done = train_here(cmd, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "launcher: resuming from" in done.stdout
    ref, got = _params(uninterrupted), _params(tmp_path / "run")
    for name, value in ref.items():
        assert torch.equal(got[name], value), name
    assert _losses(tmp_path / "run") == _losses(uninterrupted)  # one line per step, no repeats
    assert not list(checkpoint.folder(tmp_path / "run").glob("*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend",
    [
        ["backend=accelerate"],
        ["backend=deepspeed"],
        ["backend=deepspeed", "backend.zero_stage=2"],
        ["backend=deepspeed", "backend.zero_stage=3"],
        ["backend=fsdp"],
    ],
    ids=["accelerate", "deepspeed-zero0", "deepspeed-zero2", "deepspeed-zero3", "fsdp"],
)
def test_elastic_resume_2_1_2_ranks_keeps_the_global_batch(
    backend, uninterrupted, tmp_path, data_cache
):
    """Killed on 2 ranks after step 3 (last save: step 2), continued on 1 rank and killed after
    step 6 (last save: step 4), finished on 2 ranks: the plan changes micro-batch/accumulation,
    never the global batch; data order and LR continue from the consumed samples."""
    cmd = [*ARGS, f"data.cache_dir={data_cache}", "run_dir=run", *backend]
    res = run_cli(cmd, tmp_path, prefix=two(), env={"LAUNCHER_TEST_KILL": "3:step"})
    assert res.returncode != 0
    res = run_cli([*cmd, "micro_batch=32"], tmp_path, env={"LAUNCHER_TEST_KILL": "6:step"})
    assert res.returncode == -9, res.stderr[-2000:]
    assert "saved on 2 rank(s)" in res.stdout
    res = run_cli(cmd, tmp_path, prefix=two())
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step 4 of 10" in res.stdout and "saved on 1 rank(s)" in res.stdout  # killed before
    # the save of step 6: the newest checkpoint is step 4
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert (plan["global_batch"], plan["world_size"], plan["accumulation"]) == (64, 2, 2)
    ref, got = _params(uninterrupted), _params(tmp_path / "run")
    for name, value in ref.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=0, msg=name)
    ref_losses, losses = _losses(uninterrupted), _losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, 11))
    for step, loss in ref_losses.items():
        assert abs(losses[step] - loss) <= 1e-5 * abs(loss), (step, losses[step], loss)


def test_a_changed_global_batch_is_refused_and_nothing_changes(
    uninterrupted, tmp_path, monkeypatch, capsys
):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    monkeypatch.chdir(tmp_path)
    assert main([*ARGS, "global_batch=128", "run_dir=run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was trained with global batch 64" in err, err
    assert "resume with global_batch=64, or say checkpoint.allow_global_batch_change=true" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_deepspeed_without_resumable_state_runs_without_checkpoints_and_says_so(
    tmp_path, data_cache
):
    """ZeRO 0 in bf16 mode keeps its float32 masters where no public API reaches them: the plan
    says checkpoints are off and why; the run still ends with model_final.pt, and rerunning the
    same command does not train it over."""
    args = [*ARGS, f"data.cache_dir={data_cache}", "run_dir=run", "backend=deepspeed"]
    args += ["backend.mixed_precision=bf16"]
    res = run_cli(args, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    row = next(line for line in res.stdout.splitlines() if line.startswith("checkpoints "))
    assert row.split()[1] == "off" and "resuming backend=deepspeed needs ZeRO 0" in row
    assert not checkpoint.folder(tmp_path / "run").exists()
    assert (tmp_path / "run" / "model_final.pt").exists()
    again = train_here(args, tmp_path)  # refused before DeepSpeed starts: in this process
    assert again.returncode == 2 and "holds a finished run without a checkpoint" in again.stderr


def test_resume_from_a_checkpoint_file_into_a_new_run_dir(uninterrupted, tmp_path, data_cache):
    """resume=PATH takes that checkpoint (here the last one: nothing left to train) and writes
    the run into the new run_dir (in this process)."""
    source = checkpoint.checkpoints(uninterrupted)[0]
    args = [*ARGS, f"data.cache_dir={data_cache}", "run_dir=new", f"resume={source}"]
    res = train_here(args, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"launcher: resuming from {source}: step 10 of 10" in res.stdout
    for name, value in _params(uninterrupted).items():
        assert torch.equal(_params(tmp_path / "new")[name], value), name


@pytest.mark.slow
def test_an_explicit_global_batch_change_continues_at_the_consumed_samples(tmp_path, data_cache):
    """Killed after step 5 (saved at 4 = 256 samples) with global batch 64; resumed with 96 and
    checkpoint.allow_global_batch_change=true: 4 more steps of 96 consume the remaining 384
    samples (640 in all), logged loudly; the LR follows the scaling rule for 96, in samples.
    (The kill in a process; the refusal and the resumed run in this one.)"""
    cmd = [*ARGS, f"data.cache_dir={data_cache}", "run_dir=run"]
    res = run_cli(cmd, tmp_path, env={"LAUNCHER_TEST_KILL": "5:step"})
    assert res.returncode == -9
    res = train_here([*cmd, "global_batch=96", "micro_batch=32"], tmp_path)
    assert res.returncode == 2 and "allow_global_batch_change" in res.stderr
    allow = [*cmd, "global_batch=96", "micro_batch=32", "checkpoint.allow_global_batch_change=true"]
    res = train_here(allow, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "GLOBAL BATCH CHANGED on resume: 64 -> 96 from 256 samples on" in res.stderr
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert (plan["steps"], plan["origin_step"], plan["origin_samples"]) == (8, 4, 256)
    assert plan["total_samples"] == 640
    lines = [m for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert [(m["step"], m["samples"]) for m in lines] == [
        (1, 64),
        (2, 128),
        (3, 192),
        (4, 256),
        (5, 352),
        (6, 448),
        (7, 544),
        (8, 640),
    ]
    from launcher.config.compose import compose_run
    from launcher.planning.plan import PlanInput, plan_batch
    from launcher.planning.schedule import lr_at

    new = plan_batch(PlanInput(compose_run(allow[:-1]), 1, 1600, origin=(4, 256)))
    assert [m["lr"] for m in lines[4:]] == [lr_at(new, s) for s in (256, 352, 448, 544)]
    state, _ = checkpoint.load(tmp_path / "run", pytest.fail)
    assert (state["step"], state["consumed_samples"], state["global_batch"]) == (8, 640, 96)


@pytest.mark.slow
def test_time_based_checkpoints_follow_rank_0s_clock(tmp_path, data_cache):
    """every_minutes: rank 0 decides, every rank takes part in the save; with an interval far
    below one step's duration a checkpoint follows every step (and the keep limit holds)."""
    args = [*ARGS, f"data.cache_dir={data_cache}", "run_dir=run", "checkpoint.every_samples=0"]
    args += ["checkpoint.every_minutes=1e-9", "checkpoint.keep=4"]
    res = run_cli(args, tmp_path, prefix=two())
    assert res.returncode == 0, res.stderr[-2000:]
    saves = [m["step"] for m in read_metrics(tmp_path / "run") if m.get("event") == "checkpoint"]
    assert saves == list(range(1, 11))
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "run")] == [
        f"step-{s:09d}.pt" for s in (10, 9, 8, 7)
    ]


def _resumed_at_step_4_bit_identical(done, tmp_path: Path) -> None:
    """`done` resumed run/ from its step-4 checkpoint and ended as whole/ did, to the bit."""
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stdout and "step 4 of 10" in done.stdout
    for name, value in _params(tmp_path / "whole").items():
        assert torch.equal(_params(tmp_path / "run")[name], value), name
    assert _losses(tmp_path / "run") == _losses(tmp_path / "whole")


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode",
    [["backend.zero_stage=1", "backend.mixed_precision=bf16"], ["backend.zero_stage=3"]],
    ids=["zero1-bf16", "zero3"],
)
def test_deepspeed_sharded_resume_is_bit_identical(mode, tmp_path, data_cache):
    """Sharded AdamW state and (bf16 mode) float32 master weights go through the world-size-free
    form (whole float32 tensors) and back without changing a bit."""
    cmd = [*ARGS, f"data.cache_dir={data_cache}", "backend=deepspeed", "optim=adamw", *mode]
    whole = run_cli([*cmd, "run_dir=whole"], tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = run_cli([*cmd, "run_dir=run"], tmp_path, env={"LAUNCHER_TEST_KILL": "5:step"})
    assert killed.returncode == -9
    done = run_cli([*cmd, "run_dir=run"], tmp_path)
    _resumed_at_step_4_bit_identical(done, tmp_path)


@pytest.mark.slow
def test_fsdp_kill_and_resume_on_two_ranks_is_bit_identical(tmp_path, data_cache):
    """FSDP2 on 2 ranks in bf16, AdamW (its moments sharded like the parameters), killed while
    saving step 6 (its shards in place, its .pt not yet): every rank's shards written through
    torch.distributed.checkpoint and loaded back lose no bit (the sharded parameters stay
    float32); a shard folder no .pt lists is never used, and removed. (A kill after a step:
    test_a_damaged_shard_falls_back...; float32 and other world sizes: the elastic test.)"""
    kill = "6:written"
    cmd = [*ARGS, f"data.cache_dir={data_cache}", "backend=fsdp", "optim=adamw"]
    cmd += ["backend.mixed_precision=bf16"]
    whole = run_cli([*cmd, "run_dir=whole"], tmp_path, prefix=two())
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = run_cli(
        [*cmd, "run_dir=run"], tmp_path, prefix=two(), env={"LAUNCHER_TEST_KILL": kill}
    )
    assert killed.returncode != 0
    state, path = checkpoint.load(tmp_path / "run", pytest.fail)
    assert path.name == "step-000000004.pt" and state["model"] == {} and state["optimizer"] == {}
    shards = checkpoint.shards_of(path)
    assert (shards / ".metadata").is_file() and len(list(shards.glob("__*_*.distcp"))) == 2
    folder = checkpoint.folder(tmp_path / "run")
    assert (folder / "step-000000006.dcp").is_dir()  # the orphan the kill left
    done = run_cli([*cmd, "run_dir=run"], tmp_path, prefix=two())
    _resumed_at_step_4_bit_identical(done, tmp_path)
    assert all(d.with_suffix(".pt").is_file() for d in folder.glob("*.dcp"))


@pytest.mark.slow
def test_a_damaged_shard_falls_back_and_another_backend_is_refused(tmp_path, data_cache):
    """A flipped byte in a shard of the newest sharded checkpoint: reported, the one before
    used. Resuming FSDP2 shards under backend=accelerate: one line, exit 2, nothing changed."""
    cmd = [*ARGS, f"data.cache_dir={data_cache}", "backend=fsdp", "run_dir=run"]
    killed = run_cli(cmd, tmp_path, env={"LAUNCHER_TEST_KILL": "5:step"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    newest = checkpoint.shards_of(checkpoint.folder(tmp_path / "run") / "step-000000004.pt")
    shard = next(newest.glob("__0_*.distcp"))
    data = shard.read_bytes()
    shard.write_bytes(data[:50] + bytes([data[50] ^ 1]) + data[51:])
    warnings: list[str] = []
    state, path = checkpoint.load(tmp_path / "run", warnings.append)
    assert path.name == "step-000000002.pt"
    assert len(warnings) == 1 and "does not match the digest" in warnings[0]

    def files() -> list[str]:  # but the lock the killed run left, which is taken over
        return sorted(str(p) for p in (tmp_path / "run").rglob("*") if p.name != ".lock")

    before = files()
    other = train_here([*cmd[:-2], "run_dir=run", "backend=accelerate"], tmp_path)
    assert other.returncode == 2 and "holds shards written by backend=fsdp" in other.stderr
    assert files() == before


@pytest.mark.slow
def test_a_whole_checkpoint_resumes_under_fsdp(uninterrupted, tmp_path, data_cache):
    """Saved by backend=accelerate on 1 rank (whole tensors), continued under FSDP2 on 2 ranks:
    the weights and SGD momentum scattered into the shards, the run ends as the uninterrupted
    one (1e-5, the reduction order differs); its own checkpoints are then sharded."""
    cmd = [*ARGS, f"data.cache_dir={data_cache}", "run_dir=run"]
    res = run_cli(cmd, tmp_path, env={"LAUNCHER_TEST_KILL": "5:step"})
    assert res.returncode == -9, res.stderr[-2000:]
    res = run_cli([*cmd, "backend=fsdp"], tmp_path, prefix=two())
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step 4 of 10" in res.stdout and "saved on 1 rank(s)" in res.stdout
    ref, got = _params(uninterrupted), _params(tmp_path / "run")
    for name, value in ref.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=0, msg=name)
    state, path = checkpoint.load(tmp_path / "run", pytest.fail)
    assert path.name == "step-000000010.pt" and "shards" in state
