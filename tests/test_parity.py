"""Numerical parity: accumulation and data parallelism must not change what the model learns.

Stated tolerances: float64 throughout; 1e-10 absolute on parameters after several SGD steps
(the only difference is summation order, ~1e-16 per operation).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from launcher.backends.accelerate import AccelerateBackend
from launcher.compose import compose_run
from launcher.config import BackendConfig
from launcher.data import make_loader
from launcher.data.sampler import GlobalBatchSampler, eval_shards
from launcher.data.tensors import TensorPairs
from launcher.metrics import MetricsSink
from launcher.models import build_model
from launcher.optim import build_optimizer
from launcher.plan import plan_batch
from launcher.train import fit
from tests.conftest import SMALL_DATA, run_cli

TOL = 1e-10


@pytest.fixture(scope="module")
def backend() -> AccelerateBackend:
    return AccelerateBackend(BackendConfig(name="accelerate"), "cpu")


def _train_in_process(backend, micro_batch: int, optim: str) -> dict[str, torch.Tensor]:
    """Six optimizer steps of the real loop on fixed random data, float64."""
    cfg = compose_run(
        ["model=mlp", "global_batch=64", f"micro_batch={micro_batch}", f"optim={optim}"]
        + ["optim.ref_batch=32", "trainer.epochs=1", "schedule.warmup_epochs=0.5"]
    )
    g = torch.Generator().manual_seed(0)
    data = TensorPairs(torch.randn(384, 1, 40, generator=g), torch.randint(10, (384,), generator=g))
    plan = plan_batch(cfg, world_size=1, epoch_samples=len(data))
    assert plan.steps == 6 and plan.micro_batch == micro_batch
    torch.manual_seed(0)
    model = build_model(cfg.model, _spec()).double()
    optimizer = build_optimizer(plan.optimizer, cfg.optim, model, plan.lr, plan.weight_decay)
    model, optimizer = backend.prepare(model, optimizer)
    sampler = GlobalBatchSampler(
        len(data),
        global_batch=64,
        micro_batch=micro_batch,
        world_size=1,
        rank=0,
        seed=0,
        steps=plan.steps,
    )
    sink = MetricsSink(
        None, total_steps=plan.steps, global_batch=64, tensorboard=False, progress=False
    )
    fit(
        model,
        optimizer,
        plan,
        backend,
        make_loader(data, sampler),
        lambda: make_loader(data, eval_shards(len(data), 1, 0, 64)),
        sink,
        log_every=1,
        eval_every_samples=len(data),
        dtype=torch.float64,
    )
    return {k: v.detach().clone() for k, v in backend.unwrap(model).state_dict().items()}


def _spec():
    from launcher.data import DataSpec

    return DataSpec((1, 40), 10)


@pytest.mark.parametrize("optim", ["sgd", "adamw", "lars", "lamb"])
def test_accumulation_matches_one_big_batch(backend, optim: str) -> None:
    big = _train_in_process(backend, 64, optim)  # accumulation 1
    for micro in (16, 8):  # accumulation 4 and 8
        accumulated = _train_in_process(backend, micro, optim)
        for name, ref in big.items():
            torch.testing.assert_close(accumulated[name], ref, atol=TOL, rtol=0, msg=name)
    start = {k: v for k, v in _init_params().items()}
    assert any((big[k] - start[k]).abs().max() > 1e-3 for k in start), "training did not move"


def _init_params() -> dict[str, torch.Tensor]:
    cfg = compose_run(["model=mlp"])
    torch.manual_seed(0)
    return build_model(cfg.model, _spec()).double().state_dict()


PARITY_ARGS = [
    *SMALL_DATA,
    "global_batch=64",
    "trainer.epochs=0.2",
    "trainer.dtype=float64",
    "trainer.progress=false",
    "trainer.tensorboard=false",
    "trainer.log_every=1",
]  # 0.2 x 1,600 / 64 = 5 steps, all inside the warmup


def _final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt")


@pytest.fixture(scope="module")
def one_rank_reference(tmp_path_factory, data_cache) -> dict[str, torch.Tensor]:
    cwd = tmp_path_factory.mktemp("one-rank")
    res = run_cli(
        [*PARITY_ARGS, f"data.cache_dir={data_cache}", "micro_batch=32", f"run_dir={cwd / 'run'}"],
        cwd,
    )
    assert res.returncode == 0, res.stderr
    return _final_state(cwd / "run")


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"],
    "accelerate": [
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29518",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("launch", sorted(LAUNCHERS))
def test_two_gloo_ranks_match_one_rank(launch, one_rank_reference, tmp_path, data_cache) -> None:
    """2 ranks x micro 16 x accumulation 2 == 1 rank x micro 32 x accumulation 1, same samples."""
    run_dir = tmp_path / "run"
    res = run_cli(
        [*PARITY_ARGS, f"data.cache_dir={data_cache}", "micro_batch=16", f"run_dir={run_dir}"],
        tmp_path,
        prefix=[sys.executable, *LAUNCHERS[launch]],
    )
    assert res.returncode == 0, res.stderr[-3000:]
    plan = (run_dir / "plan.json").read_text()
    assert '"world_size": 2' in plan and '"accumulation": 2' in plan
    two = _final_state(run_dir)
    for name, ref in one_rank_reference.items():
        torch.testing.assert_close(two[name], ref, atol=TOL, rtol=0, msg=name)
    assert "parameters differ" not in res.stderr
    shutil.rmtree(run_dir)
