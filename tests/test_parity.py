"""Numerical parity: accumulation and data parallelism must not change what the model learns.

Stated tolerances: float64 throughout; 1e-10 absolute on parameters after several SGD steps
(the only difference is summation order, ~1e-16 per operation).
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from launcher.backends.accelerate import AccelerateBackend
from launcher.data import eval_loader, train_loader
from launcher.data.tensors import TensorPairs
from launcher.models import build_model
from launcher.models.loss import CrossEntropy
from launcher.optim import build_optimizer
from launcher.planning.plan import PlanInput, plan_batch
from launcher.training.loop import fit
from launcher.training.metrics import MetricsSink
from launcher.types.bundles import Feed, Settings, Trainee
from tests.helpers import (
    PARITY_ARGS,
    accelerate_launch,
    composed,
    final_state,
    read_metrics,
    run_cli,
    torchrun,
)

TOL = 1e-10


@pytest.fixture(scope="module")
def backend() -> AccelerateBackend:
    return AccelerateBackend(composed([]), "cpu")


def _train_in_process(
    backend, micro_batch: int, optim: str, oom_recovery: bool = True, fails: Exception | None = None
) -> dict[str, torch.Tensor]:
    """Six optimizer steps of the real loop on fixed random data, float64. `fails`: raised by
    a training forward of more than 16 samples (a device that holds no more)."""
    cfg = composed(
        ["model=mlp", "global_batch=64", f"micro_batch={micro_batch}", f"optim={optim}"]
        + ["optim.ref_batch=32", "trainer.epochs=1", "schedule.warmup_epochs=0.5"]
    )
    g = torch.Generator().manual_seed(0)
    data = TensorPairs(torch.randn(384, 1, 40, generator=g), torch.randint(10, (384,), generator=g))
    plan = plan_batch(PlanInput(cfg, world_size=1, epoch_samples=len(data)))
    assert plan.steps == 6 and plan.micro_batch == micro_batch
    torch.manual_seed(0)
    model = build_model(cfg.model, _spec()).double()
    if fails is not None:

        def full(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if module.training and len(args[0]) > 16:
                raise fails

        model.register_forward_pre_hook(full)
    optimizer = build_optimizer(plan.optimizer, cfg.optim, model, plan.lr, plan.weight_decay)
    model, optimizer = backend.prepare(model, optimizer, plan)
    sink = MetricsSink(None, total_steps=plan.steps, tensorboard=False, progress=False)
    fit(
        Trainee(model, optimizer, backend, torch.float64, CrossEntropy()),
        plan,
        Feed(
            lambda plan, step: train_loader(data, plan, 0, 0, step),
            lambda plan: eval_loader(data, plan, 0),
        ),
        sink,
        Settings(log_every=1, eval_every_samples=len(data), oom_recovery=oom_recovery),
    )
    return {k: v.detach().clone() for k, v in backend.unwrap(model).state_dict().items()}


def _spec():
    from launcher.data import DataSpec

    return DataSpec((1, 40), 10)


@pytest.mark.parametrize("optim", ["sgd", "adamw", "lars", "lamb"])
def test_accumulation_matches_one_big_batch(backend, optim: str) -> None:
    big = _train_in_process(backend, 64, optim, oom_recovery=False)  # accumulation 1, DDP path
    for micro in (16, 8):  # accumulation 4 and 8, the out-of-memory-safe path
        accumulated = _train_in_process(backend, micro, optim)
        for name, ref in big.items():
            torch.testing.assert_close(accumulated[name], ref, atol=TOL, rtol=0, msg=name)
    start = {k: v for k, v in _init_params().items()}
    assert any((big[k] - start[k]).abs().max() > 1e-3 for k in start), "training did not move"


CPU_OOM = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 8388608 bytes."


def test_an_out_of_memory_error_in_any_form_re_splits_and_matches_one_big_batch(backend) -> None:
    """An out-of-memory error however the limit is imposed (torch's OutOfMemoryError, the CPU
    allocator's RuntimeError, CUDA's text: memory/profile.py is_oom) halves the micro-batch of
    64 until 16 fits, and the run learns what one batch of 64 learns; another RuntimeError ends
    the run as raised."""
    big = _train_in_process(backend, 64, "sgd", oom_recovery=False)
    for error in (
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB"),
        RuntimeError(CPU_OOM),
        RuntimeError("CUDA error: out of memory"),
    ):
        resplit = _train_in_process(backend, 64, "sgd", fails=error)
        for name, ref in big.items():
            torch.testing.assert_close(resplit[name], ref, atol=TOL, rtol=0, msg=name)
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes"):
        _train_in_process(backend, 64, "sgd", fails=RuntimeError("mat1 and mat2 shapes differ"))


def _init_params() -> dict[str, torch.Tensor]:
    cfg = composed(["model=mlp"])
    torch.manual_seed(0)
    return build_model(cfg.model, _spec()).double().state_dict()


LAUNCHERS = {"torchrun": torchrun, "accelerate": accelerate_launch}  # each on a port free now


@pytest.mark.slow
@pytest.mark.parametrize("launch", [*sorted(LAUNCHERS), "trainer.devices=2"])
def test_two_gloo_ranks_match_one_rank(launch, one_rank_reference, tmp_path, data_cache) -> None:
    """2 ranks x micro 16 x accumulation 2 == 1 rank x micro 32 x accumulation 1, same samples;
    started by torchrun, `accelerate launch`, or the launcher itself (trainer.devices=2)."""
    run_dir = tmp_path / "run"
    spawn = launch not in LAUNCHERS
    res = run_cli(
        [*PARITY_ARGS, f"data.cache_dir={data_cache}", "micro_batch=16", f"run_dir={run_dir}"]
        + ([launch] if spawn else []),
        tmp_path,
        prefix=None if spawn else [sys.executable, *LAUNCHERS[launch]()],
    )
    assert res.returncode == 0, res.stderr[-3000:]
    plan = (run_dir / "plan.json").read_text()
    assert '"world_size": 2' in plan and '"accumulation": 2' in plan
    two = final_state(run_dir)
    for name, ref in one_rank_reference.items():
        torch.testing.assert_close(two[name], ref, atol=TOL, rtol=0, msg=name)
    assert "parameters differ" not in res.stderr
    shutil.rmtree(run_dir)


@pytest.mark.slow
def test_torch_compile_trains_the_same_model(one_rank_reference, tmp_path, data_cache) -> None:
    """trainer.compile=true (TorchInductor on CPU) learns what the eager run learns, and the
    checkpoint keeps the plain module's keys (compiled in place)."""
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    args = [*PARITY_ARGS, f"data.cache_dir={data_cache}", "micro_batch=32", "trainer.compile=true"]
    res = run_cli([*args, f"run_dir={tmp_path / 'run'}"], tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert any((tmp_path / "inductor").rglob("*.py"))  # Inductor generated kernels: it compiled
    compiled = final_state(tmp_path / "run")
    assert compiled.keys() == one_rank_reference.keys()
    for name, ref in one_rank_reference.items():
        torch.testing.assert_close(compiled[name], ref, atol=TOL, rtol=0, msg=name)


@pytest.mark.slow
def test_out_of_memory_on_one_rank_keeps_the_global_batch_and_matches_a_clean_run(
    tmp_path, data_cache
):
    """Rank 1 of 2 runs out of memory at step 2 with micro 16: both ranks drop the step and go on
    with micro 8 x accumulation 4; the result equals a run with micro 8 from the start."""
    two = [sys.executable, *torchrun()]
    common = [*PARITY_ARGS, f"data.cache_dir={data_cache}"]
    clean = run_cli([*common, "micro_batch=8", "run_dir=clean"], tmp_path, prefix=two)
    assert clean.returncode == 0, clean.stderr[-3000:]
    env = {"LAUNCHER_TEST_OOM": "1:2:8"}
    two = [sys.executable, *torchrun()]
    hit = run_cli([*common, "micro_batch=16", "run_dir=oom"], tmp_path, prefix=two, env=env)
    assert hit.returncode == 0, hit.stderr[-3000:]
    assert "OUT OF MEMORY on rank(s) [1] at step 2 with micro-batch 16" in hit.stderr
    plan = json.loads((tmp_path / "oom" / "plan.json").read_text())
    assert (plan["micro_batch"], plan["accumulation"], plan["global_batch"]) == (8, 4, 64)
    metrics = read_metrics(tmp_path / "oom")
    events = [m for m in metrics if m.get("event") == "out_of_memory"]
    assert events == [
        {"event": "out_of_memory", "step": 2, "samples": 128, "ranks": [1], "micro_batch": 8}
        | {"accumulation": 4}  # step 2 starts after 2 x 64 samples: they are rerun
    ]
    steps = [m["step"] for m in metrics if "loss" in m]
    assert steps == [1, 2, 3, 4, 5]  # the dropped step is rerun, not skipped or counted twice
    lrs = {m["step"]: m["lr"] for m in read_metrics(tmp_path / "clean") if "loss" in m}
    assert {m["step"]: m["lr"] for m in metrics if "loss" in m} == lrs  # schedule untouched
    ref, got = final_state(tmp_path / "clean"), final_state(tmp_path / "oom")
    for name, value in ref.items():
        torch.testing.assert_close(got[name], value, atol=TOL, rtol=0, msg=name)


@pytest.mark.slow
def test_out_of_memory_at_one_sample_stops_with_one_line(tmp_path, data_cache):
    res = run_cli(
        [*PARITY_ARGS, f"data.cache_dir={data_cache}", "micro_batch=2", "run_dir=r"],
        tmp_path,
        env={"LAUNCHER_TEST_OOM": "0:1:0"},
    )
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert "OUT OF MEMORY on rank(s) [0] at step 1 with micro-batch 2" in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        "launcher: error: out of memory on rank(s) [0] at step 1 with micro-batch 1: the model "
        "does not fit this device; use one with more memory, mixed precision, or a smaller model"
    )


@pytest.mark.slow
def test_two_ranks_with_batchnorm_end_with_identical_parameters_and_buffers(tmp_path):
    """ResNet-18 (BatchNorm) on 2 gloo ranks: rank 0's running statistics reach every rank after
    each step, so the end-of-run replica check over parameters and buffers passes."""
    args = ["+recipe=resnet50", "model.arch=resnet18", "data=synthetic", "data.train_samples=64"]
    args += ["data.eval_samples=16", "data.input_shape=[3,16,16]", "data.num_classes=10"]
    args += ["data.workers=0", "global_batch=16", "trainer.epochs=1", "memory.probe=false"]
    res = run_cli([*args, "run_dir=run"], tmp_path, prefix=[sys.executable, *torchrun()])
    assert res.returncode == 0, res.stderr[-3000:]
    final = read_metrics(tmp_path / "run")[-1]
    assert final["final"] and final["step"] == 4
    stats = [k for k in final_state(tmp_path / "run") if k.endswith("running_mean")]
    assert len(stats) == 20  # the buffers the check covered


class _Gather:
    """A backend stand-in whose gather returns the digests of `ranks` (this one's first)."""

    def __init__(self, *others: float) -> None:
        self.device, self.others = torch.device("cpu"), others

    def gather(self, digest: torch.Tensor) -> torch.Tensor:
        return torch.cat([digest, torch.tensor(self.others, dtype=digest.dtype)])


def test_replica_check_tells_differing_ranks_from_a_run_that_diverged():
    from launcher.training.evaluation import check_replicas
    from launcher.training.guard import Diverged

    model = torch.nn.Linear(2, 1)
    digest = check_replicas(model, _Gather(), 7)
    assert digest == pytest.approx(
        sum(float(p.detach().double().square().sum()) for p in model.parameters())
    )
    with pytest.raises(RuntimeError, match="replicas differ across ranks"):
        check_replicas(model, _Gather(digest + 1e-9), 7)
    with torch.no_grad():
        model.weight.fill_(float("nan"))  # diverged: said as such, not as differing replicas
    with pytest.raises(Diverged, match="parameters are not finite after step 7; model_final.pt"):
        check_replicas(model, _Gather(float("nan")), 7)
    with pytest.raises(Diverged):
        check_replicas(model, _Gather(1.0), 7)
