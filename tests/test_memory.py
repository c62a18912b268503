"""Memory profiles: counting, fitting, estimating, caching, and the minimum across ranks."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launcher.data import data_spec
from launcher.memory.probe import _step, estimated_cap, measured_cap, probe_peak
from launcher.memory.profile import (
    GB,
    MemoryProfile,
    StorageMeter,
    budget_bytes,
    fit_traces,
    upper_lines,
)
from launcher.planning.plan import PlanInput, plan_batch
from tests.helpers import composed, train_here


def test_storage_meter_counts_bytes_exactly():
    """Independent reference: float32 tensors of n x 1000; at most three live at once."""

    def step(n: int) -> None:
        a = torch.ones(n, 1000)
        b = torch.ones(n, 1000) * 2  # peak: a, b and the ones() temporary = 3 x 4000 n
        del a
        c = b[:, :10] + 1  # a view shares b's storage; c is new: 40 n
        assert c.sum() > 0

    for n in (1, 7, 100):
        with StorageMeter() as meter:
            step(n)
        assert meter.peak() == 3 * 4000 * n
        assert meter.live == 0  # everything was freed again


def test_storage_meter_agrees_with_torch_memtracker():
    """A second, independent count (torch.distributed._tools MemTracker) of a probe step."""
    from torch.distributed._tools.mem_tracker import MemTracker

    cfg, spec, plan = _setup("model=mlp", "optim=adamw")
    for n in (3, 64):
        tracker = MemTracker()
        with tracker:
            _step(cfg, spec, plan, "cpu", n)
        theirs = sum(v["Total"] for v in tracker.get_tracker_snapshot("peak").values())
        assert probe_peak(cfg, spec, plan, "cpu", n) == theirs


def test_upper_lines_keeps_only_lines_that_can_be_highest():
    lines = [(100, 0), (50, 10), (40, 10), (10, 20), (5, 5), (120, 1), (0, 20)]
    assert upper_lines(lines) == ((10, 20), (50, 10), (120, 1))


def test_fit_traces_aligns_ops_and_predicts_exactly():
    """live_t(n) = c_t + a_t n per op; a one-off set-up op at the start of one trace is skipped."""
    c, a = [10, 50, 90, 40], [1, 8, 2, 0]
    ops = ["w", "act", "opt", "free"]

    def trace(n, extra=()):
        return [*extra, *(ci + ai * n for ci, ai in zip(c, a, strict=True))], [
            *("setup" for _ in extra),
            *ops,
        ]

    profile = fit_traces(2, trace(2, extra=[7]), 8, trace(8), "measured")
    for n in (1, 5, 100, 1000):
        assert profile.peak(n) == max(ci + ai * n for ci, ai in zip(c, a, strict=True))
    assert profile.per_sample_bytes == 8
    with pytest.raises(ValueError, match="two different"):
        fit_traces(4, trace(4), 4, trace(4), "measured")


def test_max_micro_and_budget():
    p = MemoryProfile(((1000, 100), (1500, 0)), 0, (), "measured")
    assert [p.max_micro(b) for b in (999, 1099, 1499, 1500, 1550, 2000)] == [0, 0, 0, 5, 5, 10]
    assert MemoryProfile(((1000, 100),), 400, (), "measured").max_micro(2000) == 6
    cfg = composed(["memory.budget_gb=2", "memory.margin_gb=0.5", "memory.fraction=0.5"])
    assert budget_bytes(cfg.memory, 10 * GB)[0] == int(1.5 * GB)  # 2 GiB cap < 0.5 x 10 GiB
    assert budget_bytes(cfg.memory, 3 * GB)[0] == int(1.0 * GB)  # 0.5 x 3 GiB - 0.5 GiB


def _setup(*overrides: str, tmp_path=None):
    cache = [f"memory.cache_dir={tmp_path / 'memcache'}"] if tmp_path else []
    cfg = composed(["global_batch=512", *cache, *overrides])
    plan = plan_batch(PlanInput(cfg, 1, 32000))
    return cfg, data_spec(cfg.data), plan


def _profile(report: dict) -> MemoryProfile:
    lines = tuple(tuple(line) for line in report["lines"])
    return MemoryProfile(lines, report["overhead_bytes"], (), report["source"])


RECIPES = {
    "cnn1d": [],
    "mlp-adamw": ["model=mlp", "optim=adamw"],  # peak in the optimizer step at small batches
    "resnet18": ["+recipe=resnet50", "model.arch=resnet18", "data=synthetic", "global_batch=64"]
    + ["data.input_shape=[3,32,32]", "data.num_classes=10"],
}
RECIPES["cnn1d-float64"] = ["trainer.dtype=float64"]  # built in float64, also as fake tensors
RECIPES["resnet18-checkpointing"] = [*RECIPES["resnet18"], "model.activation_checkpointing=true"]
# a real ResNet takes seconds per case: those run with the slow tier
NAMES = [pytest.param(n, marks=pytest.mark.slow) if "resnet" in n else n for n in sorted(RECIPES)]


@pytest.mark.parametrize("name", NAMES)
def test_measured_profile_predicts_unseen_sizes_exactly_on_cpu(name, tmp_path):
    """3 probe steps (sizes 2 and 8, then the chosen size) predict counted peaks at other sizes."""
    cfg, spec, plan = _setup(*RECIPES[name], "memory.budget_gb=0.003", tmp_path=tmp_path)
    cfg = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, margin_gb=0.0))
    if name.startswith("resnet18"):  # ResNet-18 needs ~130 MiB before any sample
        cfg = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, budget_gb=0.2))
    cap, report = measured_cap(cfg, spec, plan, "cpu", 1, lambda v: v)
    assert report["source"] == "measured" and report["probe_steps"] == 3
    assert report["overhead_bytes"] == 0  # on CPU the verify step counts what the fit predicted
    profile = _profile(report)
    for n in (3, 5, 32, 100):  # (ResNet's BatchNorm cannot train on 1 sample)
        assert profile.peak(n) == probe_peak(cfg, spec, plan, "cpu", n), n
    assert probe_peak(cfg, spec, plan, "cpu", cap) <= report["budget_bytes"]
    assert probe_peak(cfg, spec, plan, "cpu", cap + 1) > report["budget_bytes"]


@pytest.mark.parametrize("name", NAMES)
def test_estimate_with_fake_tensors_matches_measurement(name, tmp_path):
    """Estimated (fake tensors, nothing allocated) vs measured on this CPU: equal at every size."""
    cfg, spec, plan = _setup(*RECIPES[name], tmp_path=tmp_path)
    _, estimated = estimated_cap(cfg, spec, plan, 16 * GB)
    assert estimated["source"] == "estimated" and estimated["probe_steps"] == 0
    for n in (3, 16, 64):
        assert _profile(estimated).peak(n) == probe_peak(cfg, spec, plan, "cpu", n), n


def test_estimate_is_cached_and_reused_without_fake_tensors(tmp_path, monkeypatch):
    """plan_only's estimate is saved like a measured profile; a second plan (another global
    batch: same model and optimizer) reads it back and traces nothing."""
    import launcher.memory.probe as probe

    cfg, spec, plan = _setup(tmp_path=tmp_path)
    cap, first = estimated_cap(cfg, spec, plan, 16 * GB)
    assert "saved to" in first["note"] and first["source"] == "estimated"

    def no_trace(*args, **kwargs):
        raise AssertionError("a cached estimate traced the model again")

    monkeypatch.setattr(probe, "probe_trace", no_trace)
    other = plan_batch(PlanInput(dataclasses.replace(cfg, global_batch=256), 1, 32000))
    assert other.optimizer == plan.optimizer
    cap2, again = estimated_cap(cfg, spec, other, 16 * GB)
    assert "from cache entry" in again["note"] and again["source"] == "estimated"
    assert (cap2, again["lines"], again["points"]) == (cap, first["lines"], first["points"])
    float64 = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, dtype="float64"))
    with pytest.raises(AssertionError, match="traced the model again"):  # a new key: traced
        estimated_cap(float64, spec, plan, 16 * GB)


def test_estimate_without_a_writable_cache_still_plans(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg, spec, plan = _setup(f"memory.cache_dir={blocker / 'memcache'}")
    cap, report = estimated_cap(cfg, spec, plan, 16 * GB)
    assert cap >= 1 and "not cached" in report["note"]


def test_cache_hit_miss_and_corrupt_entries(tmp_path):
    cfg, spec, plan = _setup(tmp_path=tmp_path)
    _, first = measured_cap(cfg, spec, plan, "cpu", 1, lambda v: v)
    assert first["source"] == "measured" and first["probe_steps"] == 3
    _, again = measured_cap(cfg, spec, plan, "cpu", 1, lambda v: v)
    assert again["source"] == "cached" and again["probe_steps"] == 0
    assert again["lines"] == first["lines"]
    wider, spec2, plan2 = _setup("model.channels=50", tmp_path=tmp_path)  # another key: a miss
    _, other = measured_cap(wider, spec2, plan2, "cpu", 1, lambda v: v)
    assert other["source"] == "measured" and other["lines"] != first["lines"]
    entries = sorted((tmp_path / "memcache").glob("*.json"))
    assert len(entries) == 2
    for bad in ("{not json", json.dumps({"key": {}, "lines": [[1, 1]]}), "[]"):
        for entry in entries:
            entry.write_text(bad)
        _, redo = measured_cap(cfg, spec, plan, "cpu", 1, lambda v: v)
        assert redo["source"] == "measured" and "ignored" in redo["note"]
        assert redo["lines"] == first["lines"]


def test_one_sample_over_budget_is_a_config_error(tmp_path):
    from launcher.errors import ConfigError

    cfg, spec, plan = _setup("memory.budget_gb=0.00001", "memory.margin_gb=0", tmp_path=tmp_path)
    with pytest.raises(ConfigError, match="memory: one sample needs"):
        measured_cap(cfg, spec, plan, "cpu", 1, lambda v: v)


def _rank_main(rank: int, port: int, budgets: tuple[float, float], cache: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    cfg = composed(
        ["global_batch=512", f"memory.budget_gb={budgets[rank]}", "memory.margin_gb=0"]
        + [f"memory.cache_dir={cache}/{rank}"]
    )
    plan = plan_batch(PlanInput(cfg, 2, 32000))

    def all_min(v: int) -> int:
        t = torch.tensor([v])
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t)

    cap, report = measured_cap(cfg, data_spec(cfg.data), plan, "cpu", 2, all_min)
    local = report["budget_bytes"]
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"cap": cap, "local_fit": _profile(report).max_micro(local)}, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_with_different_budgets_agree_on_the_minimum(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "result")
    mp.spawn(_rank_main, args=(port, (0.002, 0.001), str(tmp_path), out), nprocs=2, join=True)
    results = [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)]
    assert results[0]["cap"] == results[1]["cap"] == results[1]["local_fit"]
    assert results[0]["local_fit"] > results[1]["local_fit"]  # rank 0 alone would pick more


def test_an_out_of_memory_error_is_a_ceiling_not_a_new_line() -> None:
    """(budget, micro) that ran out of memory caps runs with no more room below it, never below
    1 sample, and leaves the measured lines (and so every other budget) alone."""
    lines = ((1000, 100),)
    p = MemoryProfile(lines, 0, (), "cached", ceilings=((5000, 20), (3000, 30)))
    assert p.line_cap(5000) == 40 and p.max_micro(5000) == 19  # the ceiling at this budget
    assert p.max_micro(2500) == 15  # less room: the lines are lower than both ceilings
    assert p.max_micro(3000) == 19 and p.ceiling(3000) == 19  # the smaller failed size wins
    assert p.max_micro(5500) == 19  # within 10%: free memory moves a little between runs
    assert p.max_micro(9000) == 80  # more room than any failure had: the lines alone
    tiny = MemoryProfile(lines, 0, (), "cached", ceilings=((5000, 2),))
    assert tiny.max_micro(5000) == 1  # a ceiling lowers a cap, it never refuses a run
    assert tiny.max_micro(900) == 0  # what the measured lines refuse stays refused
    assert p.peak(10) == MemoryProfile(lines, 0, (), "measured").peak(10)


@pytest.mark.slow
def test_one_out_of_memory_event_does_not_poison_later_runs(tmp_path, data_cache):
    """The issue's reproduction: an injected out-of-memory error at step 5 of a run; then runs of
    the same config still plan, at a budget of 10 GiB too (refused before: the cache had grown
    the fixed overhead past the failed size), and memory.cache=refresh measures again."""
    cache = tmp_path / "memcache"
    args = [f"data.cache_dir={data_cache}", "data.num_samples=4000", "trainer.epochs=1"]
    args += [f"memory.cache_dir={cache}", "trainer.progress=false", "trainer.tensorboard=false"]
    hit = train_here([*args, "run_dir=hit"], tmp_path, env={"LAUNCHER_TEST_OOM": "0:5:64"})
    assert hit.returncode == 0, hit.stderr[-3000:]
    assert "OUT OF MEMORY on rank(s) [0] at step 5 with micro-batch 512" in hit.stderr
    (entry,) = cache.glob("*.json")
    stored = json.loads(entry.read_text())
    assert [micro for _, micro in stored["ceilings"]] == [512, 256, 128]  # 64 fitted
    assert stored["lines"] == json.loads(entry.read_text())["lines"]
    short = ["trainer.epochs=0.2", "checkpoint.keep=1"]
    for name, budget in (("small", ["memory.budget_gb=10"]), ("same", [])):
        run = train_here([*args, *short, *budget, f"run_dir={name}"], tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        row = next(line for line in run.stdout.splitlines() if line.startswith("memory "))
        assert "fits 127 samples (capped at 127;" in row, row  # the lines themselves unchanged
    fresh = train_here([*args, *short, "memory.cache=refresh", "run_dir=r"], tmp_path)
    assert fresh.returncode == 0 and "capped" not in fresh.stdout, fresh.stderr[-3000:]
    assert (
        "ceilings" not in json.loads(entry.read_text())
        or not json.loads(entry.read_text())["ceilings"]
    )


def test_an_out_of_memory_in_training_teaches_the_cache(tmp_path):
    """After record_oom at micro m, the cached profile no longer lets m fit the same budget."""
    from launcher.memory.probe import _cache_key, record_oom
    from launcher.memory.profile import load_cached

    cfg, spec, plan = _setup("memory.budget_gb=0.002", "memory.margin_gb=0", tmp_path=tmp_path)
    cap, report = measured_cap(cfg, spec, plan, "cpu", 1, lambda v: v)
    failed = cap // 2  # the device disagreed with the profile at half the cap
    record_oom(cfg, spec, plan, "cpu", report, failed)
    cached, note = load_cached(cfg.memory.cache_dir, _cache_key(cfg, spec, plan, "cpu"))
    assert cached is not None, note
    assert cached.max_micro(report["budget_bytes"]) == failed - 1
    again, report2 = measured_cap(cfg, spec, plan, "cpu", 1, lambda v: v)
    assert report2["source"] == "cached" and again == failed - 1


OOMS = {  # however the memory limit is imposed, as each reaches the model's forward
    "torch.OutOfMemoryError": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
    "CUDA error text": RuntimeError("CUDA error: out of memory"),
    "CPU allocator text": RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
        "tried to allocate 1024 bytes"
    ),
}


def _forward_raises(monkeypatch, error: BaseException, from_micro: int = 0) -> None:
    """The probe's model raises `error` in its forward at micro-batches >= from_micro."""
    import launcher.memory.probe as probe

    build = probe.build_model

    def raising(*args, **kwargs):
        model = build(*args, **kwargs)

        def hook(module, inputs):
            if inputs[0].shape[0] >= from_micro:
                raise error

        model.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(probe, "build_model", raising)


@pytest.mark.parametrize("kind", sorted(OOMS))
def test_out_of_memory_in_the_probe_forward_is_out_of_memory_not_a_config_error(
    kind, tmp_path, monkeypatch
):
    """The probe's model check wraps a model's errors into one ConfigError line, but an
    out-of-memory error raised inside the forward stays itself (bench/memory_finder.py's virtual
    device raises the CPU allocator's text), and the first probe sizes fall back to 1 and 2."""
    from launcher.memory.probe import _first_traces
    from launcher.memory.profile import is_oom

    cfg, spec, plan = _setup(tmp_path=tmp_path)
    _forward_raises(monkeypatch, OOMS[kind])
    with pytest.raises(RuntimeError) as raised:
        _step(cfg, spec, plan, "cpu", 2)
    assert raised.value is OOMS[kind] and is_oom(raised.value)
    monkeypatch.undo()
    _forward_raises(monkeypatch, OOMS[kind], from_micro=3)  # the probe sizes 2 and 8: 8 fails
    assert [n for n, _ in _first_traces(cfg, spec, plan, "cpu")] == [1, 2]


def test_a_shape_error_in_the_probe_forward_is_still_one_config_error_line(tmp_path, monkeypatch):
    """A genuine model error (a layer of the wrong width for the data) is not out of memory."""
    import launcher.memory.probe as probe
    from launcher.errors import ConfigError
    from launcher.memory.profile import is_oom

    cfg, spec, plan = _setup(tmp_path=tmp_path)
    wrong = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(spec.input_shape[-1] + 1, 10))
    monkeypatch.setattr(probe, "build_model", lambda *args, **kwargs: wrong)
    with pytest.raises(ConfigError) as raised:
        _step(cfg, spec, plan, "cpu", 2)
    message = str(raised.value)
    assert "\n" not in message and "RuntimeError: mat1 and mat2 shapes" in message, message
    assert not is_oom(raised.value.__cause__)
