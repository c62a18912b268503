"""backend=fsdp (FSDP2, launcher/backends/fsdp.py) against DDP on 2 real gloo ranks.

Stated tolerances: float64 runs match the one-rank reference to 1e-10 (as every other launch in
test_parity.py); float32 runs match the DDP run's logged losses within 1e-5 relative and its
final parameters within 1e-5 absolute (only the reduction order differs: reduce-scatter of
shards vs all-reduce of whole gradients).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from textwrap import dedent

import pytest
import torch

from tests.helpers import (
    PARITY_ARGS,
    ROOT,
    composed,
    final_state,
    read_metrics,
    refused_in_process,
    run_cli,
    torchrun,
)

TINY_GPT = [
    "+recipe=gpt_small",
    "model.layers=2",
    "model.width=32",
    "model.heads=2",
    "data.seq_len=16",
    "global_batch=32",
    "micro_batch=8",
    "trainer.epochs=0.1",
    "trainer.log_every=1",
    "trainer.progress=false",
    "trainer.tensorboard=false",
    "memory.probe=false",
    "trainer.devices=2",
]


def _losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


def _same_training(run: Path, ref: Path, rel: float = 1e-5, atol: float = 1e-5) -> None:
    """Every logged loss within `rel`, the final parameters within `atol`, training moved."""
    got, want = _losses(run), _losses(ref)
    assert got.keys() == want.keys() and len(want) > 3
    for step, loss in want.items():
        assert abs(got[step] - loss) <= rel * abs(loss), (step, got[step], loss)
    a, b = final_state(run), final_state(ref)
    assert a.keys() == b.keys()
    for name, value in b.items():
        torch.testing.assert_close(a[name], value, atol=atol, rtol=0, msg=name)
    assert want[min(want)] - want[max(want)] > 0.01, "the loss did not fall"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    import random

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "loop", "return", "def", "class"]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(12000)))
    return path


@pytest.fixture(scope="module")
def gpt_ddp(tmp_path_factory, corpus) -> Path:
    cwd = tmp_path_factory.mktemp("gpt-ddp")
    res = run_cli([*TINY_GPT, f"data.path={corpus}", "backend=accelerate", "run_dir=run"], cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    return cwd / "run"


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ["trainer.oom_recovery=false"],
        ["model.activation_checkpointing=true", "backend.reshard_after_forward=false"],
    ],
    ids=["in-backward-reduction", "checkpointing"],
)
def test_gpt_small_under_fsdp_matches_ddp(extra, gpt_ddp, corpus, tmp_path) -> None:
    """The same plan trains the same model: FSDP2's own reduce-scatter in backward, and sharded
    activation-checkpointed blocks under the deferred (OOM-safe) reduction, the default (also
    in test_a_token_stated_ramp_up_under_fsdp_matches_ddp and the float64 test)."""
    res = run_cli(
        [*TINY_GPT, f"data.path={corpus}", "backend=fsdp", "run_dir=run", *extra], tmp_path
    )
    assert res.returncode == 0, res.stderr[-3000:]
    _same_training(tmp_path / "run", gpt_ddp)


@pytest.mark.slow
def test_a_token_stated_ramp_up_under_fsdp_matches_ddp(corpus, tmp_path) -> None:
    """global_batch_tokens with a ramp-up stated in tokens (16 -> 32 -> 64 sequences of 16
    tokens): each stage re-splits the micro-steps, the loss is per token over the global
    batch, and FSDP2 trains what DDP trains."""
    tiny = [a for a in TINY_GPT if not a.startswith("global_batch=")]  # stated in tokens here
    args = [*tiny, f"data.path={corpus}", "global_batch_tokens=1024", "micro_batch=4"]
    args += ["ramp.start_batch_tokens=256", "ramp.tokens=4096"]
    for backend in ("accelerate", "fsdp"):
        res = run_cli([*args, f"backend={backend}", f"run_dir={backend}"], tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
    batches = [m["global_batch"] for m in read_metrics(tmp_path / "fsdp") if "loss" in m]
    assert batches[0] == 16 and 32 in batches and batches[-1] == 64
    _same_training(tmp_path / "fsdp", tmp_path / "accelerate")


@pytest.mark.slow
def test_compile_under_fsdp_compiles_each_block_and_trains_the_same(gpt_ddp, corpus, tmp_path):
    """trainer.compile=true: each sharded block's forward is compiled (Inductor wrote kernels;
    a whole-model compile would stop at FSDP2's hooks and compile nothing) and learns what the
    DDP run learns."""
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    args = [*TINY_GPT, f"data.path={corpus}", "backend=fsdp", "trainer.compile=true"]
    res = run_cli([*args, "run_dir=run"], tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert any((tmp_path / "inductor").rglob("*.py"))
    _same_training(tmp_path / "run", gpt_ddp)


@pytest.mark.slow
def test_fsdp_float64_matches_the_one_rank_reference(
    one_rank_reference, tmp_path, data_cache
) -> None:
    """2 ranks x micro 16 x accumulation 2 under FSDP2 (the deferred reduction) == 1 rank x
    micro 32 (float64, 1e-10: gradients reduce in the parameters' own dtype)."""
    res = run_cli(
        [*PARITY_ARGS, f"data.cache_dir={data_cache}", "micro_batch=16", "run_dir=run"]
        + ["backend=fsdp"],
        tmp_path,
        prefix=[sys.executable, *torchrun()],
    )
    assert res.returncode == 0, res.stderr[-3000:]
    two = final_state(tmp_path / "run")
    for name, ref in one_rank_reference.items():
        torch.testing.assert_close(two[name], ref, atol=1e-10, rtol=0, msg=name)


@pytest.mark.slow
def test_the_example_user_model_under_fsdp_matches_ddp(tmp_path) -> None:
    """examples/waves (a model of your own, BatchNorm in its blocks) from a copy outside the
    repository: FSDP2 shards its ConvBlocks (model.checkpoint_blocks) and trains as DDP does."""
    project = Path(shutil.copytree(ROOT / "examples" / "waves", tmp_path / "waves"))
    args = ["--config-dir", "conf", "+recipe=waves", "trainer.epochs=0.5", "trainer.devices=2"]
    args += ["trainer.log_every=1", "trainer.progress=false", "trainer.tensorboard=false"]
    args += ["micro_batch=64", "memory.probe=false"]
    for backend in ("accelerate", "fsdp"):
        res = run_cli([*args, f"backend={backend}", f"run_dir={backend}"], project)
        assert res.returncode == 0, res.stderr[-3000:]
    _same_training(project / "fsdp", project / "accelerate")


MODEL = '''
import os

import torch
from torch import nn


class Stack(nn.Module):
    """Blocks in an nn.ModuleList (FSDP2's default units for a model naming none); rank 1 runs
    out of memory after the first block of a training forward above OOM_ABOVE samples."""

    def __init__(self, features=40, width=32, classes=10, depth=3):
        super().__init__()
        self.inp = nn.Sequential(nn.Flatten(), nn.Linear(features, width))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.blocks[0](self.inp(x))
        limit = int(os.environ.get("OOM_ABOVE", "0"))
        if limit and torch.is_grad_enabled() and os.environ.get("RANK") == "1" and len(x) > limit:
            raise torch.OutOfMemoryError("test: the activations do not fit")
        for block in self.blocks[1:]:
            x = block(x)
        return self.head(x)
'''


@pytest.mark.slow
def test_out_of_memory_mid_forward_on_one_rank_keeps_the_global_batch(tmp_path, data_cache) -> None:
    """Rank 1 fails inside a forward (after FSDP2 began the step: its first unit ran) while
    rank 0 goes on: no hang, every rank drops the step, the micro-batch halves, the same
    samples are rerun, and training equals the DDP run that never failed."""
    (tmp_path / "oomproj.py").write_text(dedent(MODEL))
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "stack.yaml").write_text("_target_: oomproj.Stack\n")
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}"}
    args = ["--config-dir", "conf", "model=stack", *PARITY_ARGS[:-1], "trainer.log_every=1"]
    args += [f"data.cache_dir={data_cache}", "micro_batch=32", "trainer.devices=2"]
    args += ["trainer.epochs=0.4", "trainer.dtype=float32", "memory.probe=false"]
    ddp = run_cli([*args, "backend=accelerate", "run_dir=ddp"], tmp_path, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    res = run_cli([*args, "backend=fsdp", "run_dir=fsdp"], tmp_path, env=env | {"OOM_ABOVE": "16"})
    assert res.returncode == 0, res.stderr[-3000:]
    events = [m for m in read_metrics(tmp_path / "fsdp") if m.get("event") == "out_of_memory"]
    assert [(e["ranks"], e["micro_batch"], e["accumulation"]) for e in events] == [([1], 16, 2)]
    assert "OUT OF MEMORY on rank(s) [1] at step 0" in res.stderr
    _same_training(tmp_path / "fsdp", tmp_path / "ddp", rel=1e-5, atol=1e-5)


def test_shard_units_follow_the_models_blocks() -> None:
    """The wrap policy: the built-in model's blocks (with their checkpoint wrappers), else the
    members of each nn.ModuleList, nested ones left to their outer unit; else none."""
    from torch import nn

    from launcher.backends.fsdp import shard_units
    from launcher.data import DataSpec
    from launcher.models import blocks_of, build_model

    spec = DataSpec((16,), 256, tokens=True)
    for checkpointing in ("false", "true"):
        cfg = composed(
            ["+recipe=gpt_small", "model.layers=3", "model.width=32", "model.heads=2"]
            + [f"model.activation_checkpointing={checkpointing}"]
        )
        model = build_model(cfg.model, spec)
        units = shard_units(model, blocks_of(cfg.model, model))
        assert len(units) == 3 and all(u in list(model.modules()) for u in units)
        kind = "CheckpointWrapper" if checkpointing == "true" else "TransformerEncoderLayer"
        assert {type(u).__name__ for u in units} == {kind}
    lists = nn.Sequential(nn.ModuleList([nn.Linear(2, 2), nn.ModuleList([nn.Linear(2, 2)])]))
    assert [type(u).__name__ for u in shard_units(lists, ())] == ["Linear", "ModuleList"]
    assert shard_units(nn.Sequential(nn.Linear(2, 2)), ()) == []


def test_the_plan_says_what_fsdp_does_and_refuses_what_it_cannot(
    tmp_path, monkeypatch, capsys
) -> None:
    from launcher.planning.plan import PlanInput, plan_batch

    plan = plan_batch(PlanInput(composed(["backend=fsdp"]), world_size=2, epoch_samples=4000))
    assert plan.oom_recovery and plan.checkpoints and plan.noise == "off"
    args = ["backend=fsdp", "backend.mixed_precision=fp16", "plan_only=true"]
    assert "backend.mixed_precision" in refused_in_process(args, tmp_path, monkeypatch, capsys)
    args = ["backend=fsdp", "ramp.mode=adaptive", "ramp.start_batch=32", "plan_only=true"]
    line = refused_in_process(args, tmp_path, monkeypatch, capsys)
    assert "gradients are reduce-scattered" in line
