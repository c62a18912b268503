"""backend=deepspeed: ds_config from the plan, what is refused, and parity with Accelerate.

Stated tolerances (float32 on 2 gloo ranks, same data, seed and plan): ZeRO 0 and 1 reduce in the
same order as the Accelerate path, ZeRO 2 and 3 in partitioned buckets, so parameters may differ
by summation order only: 1e-6 absolute after 5 steps (measured: 0 for ZeRO 0/1, 7.5e-9 for 2/3),
and every logged loss within 1e-6 relative.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from launcher.backends.ds_config import ds_config
from launcher.cli import main
from launcher.errors import ConfigError
from launcher.planning.plan import PlanInput, plan_batch
from tests.helpers import (
    SMALL_DATA,
    accelerate_launch,
    composed,
    free_port,
    read_metrics,
    run_cli,
    run_process,
    torchrun,
    train_here,
)

ATOL = 1e-6
LOSS_RTOL = 1e-6
DS = "backend=deepspeed"


def _config(args: list[str], device: str = "cpu", world: int = 2) -> dict:
    cfg = composed(["global_batch=64", "micro_batch=16", *args])
    return ds_config(cfg, plan_batch(PlanInput(cfg, world, 1600)), device)


CONFIGS = [
    (
        [DS],
        {
            "train_batch_size": 64,
            "train_micro_batch_size_per_gpu": 16,
            "gradient_accumulation_steps": 2,
            "managed_gradient_accumulation": False,
            "zero_optimization": {"stage": 0},
            "bf16": {"enabled": False},
            "fp16": {"enabled": False},
            "gradient_clipping": 1.0,  # the mnist1d recipe's optim.clip_grad_norm
        },
    ),
    (
        [DS, "backend.zero_stage=2", "backend.mixed_precision=bf16", "optim.clip_grad_norm=0"],
        {
            "zero_optimization": {"stage": 2},
            "bf16": {"enabled": True},
            "gradient_clipping": 0.0,
            "zero_allow_untested_optimizer": True,
        },
    ),
    (
        [DS, "backend.mixed_precision=bf16", "backend.autocast=true"],
        {"bf16": {"enabled": False}, "torch_autocast": {"enabled": True, "dtype": "bfloat16"}},
    ),
    (
        [DS, "micro_batch=8"],
        {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4},
    ),
]


@pytest.mark.parametrize(("args", "expected"), CONFIGS, ids=[" ".join(a) for a, _ in CONFIGS])
def test_ds_config_comes_from_the_plan(args, expected):
    config = _config(args)
    for key, value in expected.items():
        assert config[key] == value, key
    b, m, g = (
        config[k]
        for k in (
            "train_batch_size",
            "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps",
        )
    )
    assert b == m * g * 2  # DeepSpeed's own assertion can never fire


FUSED = [
    (["optim=adamw"], "AdamW", {"adam_w_mode": True, "eps": 1e-8}),
    (["optim=adam"], "Adam", {"adam_w_mode": False, "eps": 1e-8}),  # DeepSpeed's Adam is AdamW
    (["optim=adamw", "optim.large_batch.threshold=32"], "Lamb", {"eps": 1e-6}),  # swapped in
]


@pytest.mark.parametrize(("args", "kind", "params"), FUSED, ids=[k for _, k, _ in FUSED])
def test_fused_optimizer_section_on_cuda(args, kind, params):
    config = _config([DS, "backend.fused_optimizer=true", *args], device="cuda")
    assert config["optimizer"]["type"] == kind
    assert params.items() <= config["optimizer"]["params"].items()
    assert config["optimizer"]["params"]["lr"] > 0


REFUSED = [
    ([DS, "trainer.dtype=float64"], "trainer.dtype='float64': backend=deepspeed reduces float32"),
    (
        [DS, "optim=lars", "backend.zero_stage=1"],
        "backend.zero_stage=1: the plan's optimizer is lars",
    ),
    (
        [DS, "optim=adamw", "optim.large_batch.threshold=32", "backend.zero_stage=2"],
        "backend.zero_stage=2: the plan's optimizer is lamb",  # the swap, not the user, chose LAMB
    ),
    ([DS, "backend.mixed_precision=fp16"], "DeepSpeed's fp16 mode needs CUDA"),
    ([DS, "backend.fused_optimizer=true"], "fused optimizers are CUDA kernels"),
    ([DS, "backend.zero_stage=4"], "backend.zero_stage=4: must be 0, 1, 2 or 3"),
    ([DS, "backend.zero_stage=2", "trainer.oom_recovery=true"], "not possible with backend.zero"),
    ([DS, "backend.config_file=/nonexistent/ds.json"], "/nonexistent/ds.json': no such file"),
]


@pytest.mark.parametrize(("args", "message"), REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_what_deepspeed_cannot_run_is_one_line_exit_2(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*args, "plan_only=true", "memory.probe=false"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_half_mode_with_batchnorm_is_refused_before_anything_is_written(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    args = ["+recipe=resnet50", "model.arch=resnet18", "data=synthetic", "data.train_samples=32"]
    args += ["data.input_shape=[3,16,16]", "global_batch=16", "memory.probe=false", DS]
    assert main([*args, "backend.mixed_precision=bf16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "add backend.autocast=true" in err, err
    assert "'bn1.running_mean'" in err
    assert list(tmp_path.iterdir()) == []


def test_fused_sgd_is_refused_even_on_cuda():
    with pytest.raises(ConfigError, match="DeepSpeed has no fused sgd"):
        _config([DS, "backend.fused_optimizer=true"], device="cuda")


@pytest.mark.parametrize(
    ("extra", "recovery"),
    [
        ([], True),
        (["backend.zero_stage=1"], True),
        (["backend.zero_stage=2"], False),
        (["backend.zero_stage=3"], False),
        (["trainer.oom_recovery=false"], False),
    ],
)
def test_oom_recovery_auto_follows_the_zero_stage(extra, recovery):
    plan = plan_batch(PlanInput(composed([DS, *extra]), 1, 1600))
    assert plan.oom_recovery is recovery
    assert ("ZeRO stage" in plan.reasons["oom_recovery"]) is (
        "backend.zero_stage=2" in extra or "backend.zero_stage=3" in extra
    )


def _write(path: Path, config: dict) -> str:
    path.write_text(json.dumps(config))
    return str(path)


def test_a_given_ds_config_keeps_its_own_keys_and_must_agree_with_the_plan(tmp_path):
    mine = {"zero_optimization": {"stage": 2, "overlap_comm": True}, "steps_per_print": 50}
    f = _write(tmp_path / "ds.json", mine)
    config = _config([DS, "backend.zero_stage=2", f"backend.config_file={f}"])
    assert config["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert config["steps_per_print"] == 50 and config["train_batch_size"] == 64
    for bad, message in [
        ({"train_batch_size": 128}, "train_batch_size=128 but the launcher's plan (global batch)"),
        ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4 but the launcher's"),
        ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage=3 but the launcher's"),
        ({"optimizer": {"type": "Adam"}}, "has an optimizer section"),
        ([1, 2], "must hold a JSON object"),
    ]:
        f = _write(tmp_path / "bad.json", bad)
        with pytest.raises(ConfigError, match="backend.config_file=") as info:
            _config([DS, "backend.zero_stage=2", f"backend.config_file={f}"])
        assert message in str(info.value)


def test_plan_only_writes_the_ds_config_a_run_would_use(tmp_path, monkeypatch):
    args = [DS, "global_batch=512", "cluster=a100x8", "plan_only=true", "memory.probe=false"]
    monkeypatch.chdir(tmp_path)
    assert main([*args, "backend.zero_stage=1", "run_dir=p"]) == 0
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    config = json.loads((tmp_path / "p" / "ds_config.json").read_text())
    assert config["train_batch_size"] == plan["global_batch"] == 512
    assert config["train_micro_batch_size_per_gpu"] == plan["micro_batch"]
    assert config["gradient_accumulation_steps"] == plan["accumulation"]
    assert config["zero_optimization"] == {"stage": 1}


# ------------------------------------------------------------------- real runs on 2 gloo ranks
RUN_ARGS = [
    *SMALL_DATA,
    "global_batch=64",
    "micro_batch=16",
    "trainer.epochs=0.2",
    "trainer.progress=false",
    "trainer.tensorboard=false",
    "trainer.log_every=1",
    "memory.probe=false",
]  # 5 steps of micro 16 x accumulation 2 x 2 ranks, inside the warmup


def _launcher(name: str) -> list[str]:
    """2 CPU processes through torchrun or `accelerate launch` (MULTI_CPU on gloo), each on a
    port free now."""
    return [sys.executable, *(torchrun() if name == "torchrun" else accelerate_launch())]


def _run(
    args: list[str],
    cwd: Path,
    name: str,
    env: dict | None = None,
    launcher: str = "torchrun",
) -> Path:
    """A 2-rank run with no C++ extension built: TORCH_EXTENSIONS_DIR must stay empty."""
    ext = cwd / f"{name}-torch-extensions"
    ext.mkdir()
    res = run_cli(
        [*RUN_ARGS, *args, f"run_dir={name}"],
        cwd,
        prefix=_launcher(launcher),
        env={"TORCH_EXTENSIONS_DIR": str(ext), **(env or {})},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert list(ext.iterdir()) == [], "a DeepSpeed op was JIT-compiled"
    assert "[INFO]" not in res.stdout  # DeepSpeed's INFO lines: in launcher.log, not stdout
    return cwd / name


def _assert_same_training(got: Path, ref: Path, atol: float = ATOL) -> None:
    a, b = torch.load(ref / "model_final.pt"), torch.load(got / "model_final.pt")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=atol, rtol=0, msg=name)
    losses = [[m["loss"] for m in read_metrics(d) if "loss" in m] for d in (ref, got)]
    assert len(losses[0]) == len(losses[1]) == 5
    for x, y in zip(*losses, strict=True):
        assert abs(x - y) <= LOSS_RTOL * abs(x), losses
    assert read_metrics(got)[-1]["final"]  # the end-of-run replica check passed


@pytest.fixture(scope="module")
def accelerate_runs(tmp_path_factory, data_cache) -> dict[str, Path]:
    """The Accelerate backend's runs, one per optimizer, that DeepSpeed must reproduce."""
    cwd = tmp_path_factory.mktemp("accelerate")
    return {
        optim: _run([f"data.cache_dir={data_cache}", f"optim={optim}"], cwd, optim)
        for optim in ("sgd", "lars", "lamb")
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("optim", "extra"),
    [
        ("sgd", ["backend.zero_stage=0"]),
        ("sgd", ["backend.zero_stage=1"]),
        ("sgd", ["backend.zero_stage=2", "model.activation_checkpointing=true"]),
        ("sgd", ["backend.zero_stage=3"]),
        ("lars", ["backend.zero_stage=0"]),
        ("lamb", ["backend.zero_stage=0"]),
    ],
    ids=["zero0", "zero1", "zero2-checkpointing", "zero3", "lars-zero0", "lamb-zero0"],
)
def test_deepspeed_matches_accelerate(optim, extra, accelerate_runs, tmp_path, data_cache):
    """(ZeRO 0 is started by `accelerate launch`, the others by torchrun.)"""
    launcher = "accelerate" if extra == ["backend.zero_stage=0"] and optim == "sgd" else "torchrun"
    args = [DS, f"optim={optim}", f"data.cache_dir={data_cache}", *extra]
    got = _run(args, tmp_path, "ds", launcher=launcher)
    _assert_same_training(got, accelerate_runs[optim])
    config = json.loads((got / "ds_config.json").read_text())
    assert config["gradient_accumulation_steps"] == 2 and config["train_batch_size"] == 64


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["zero0", "zero2", "zero1-autocast"])
def test_bf16_trains_like_float32_and_saves_float32_weights(
    mode, accelerate_runs, tmp_path, data_cache
):
    """DeepSpeed's bf16 mode (bf16 module, float32 master weights) and its autocast mode against
    the float32 Accelerate run: model_final.pt holds float32 weights, each within 1% (relative
    norm) of
    float32 training, losses within 1e-3 relative (measured: 0.2-0.3% and 3e-5)."""
    args = [DS, f"backend.zero_stage={mode[4]}", "backend.mixed_precision=bf16"]
    args += ["backend.autocast=true"] if mode.endswith("autocast") else []
    got = _run([*args, f"data.cache_dir={data_cache}"], tmp_path, "bf16")
    ref, state = (
        torch.load(accelerate_runs["sgd"] / "model_final.pt"),
        torch.load(got / "model_final.pt"),
    )
    for name, value in ref.items():
        assert state[name].dtype == value.dtype, name
        if value.is_floating_point():
            assert (state[name] - value).norm() <= 1e-2 * value.norm(), name
    runs = (accelerate_runs["sgd"], got)
    losses = [[m["loss"] for m in read_metrics(d) if "loss" in m] for d in runs]
    assert len(losses[1]) == 5
    for x, y in zip(*losses, strict=True):
        assert abs(x - y) <= 1e-3 * abs(x), losses


@pytest.mark.slow
def test_the_deepspeed_launcher_runs_a_written_ds_config_unchanged(
    accelerate_runs, tmp_path, data_cache
):
    """plan_only for 1 node x 2 devices writes ds_config.json; the `deepspeed` launcher trains
    with that file as it is and reproduces the Accelerate run. The same file under 1 process is
    refused by the plan (its accumulation is 2, one process needs 4), not by DeepSpeed. (The plan
    and the refusal in this process.)"""
    common = [*RUN_ARGS, DS, "backend.zero_stage=1", f"data.cache_dir={data_cache}"]
    two = ["cluster.nodes=1", "cluster.devices_per_node=2", "cluster.device=cpu"]
    res = train_here([*common, *two, "plan_only=true", "run_dir=plan"], tmp_path)
    assert res.returncode == 0, res.stderr
    written = tmp_path / "plan" / "ds_config.json"
    before = written.read_text()
    use = [*common, f"backend.config_file={written}"]
    deepspeed = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "--module",
        "launcher",
    ]  # adds --local_rank=N
    res = run_process([*deepspeed, *use, "run_dir=run"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 cpu process(es) on 1 node(s)" in res.stdout
    _assert_same_training(tmp_path / "run", accelerate_runs["sgd"])
    assert written.read_text() == before

    res = train_here([*use, "run_dir=one"], tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert (
        res.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"launcher: error: backend.config_file='{written}': gradient_accumulation_steps=2 but "
            "the launcher's plan (accumulation) gives 4"
        )
    )
    assert not (tmp_path / "one").exists()


@pytest.mark.slow
def test_out_of_memory_under_zero1_keeps_the_global_batch(tmp_path, data_cache):
    """Rank 1 runs out of memory at step 2 with micro 16: both ranks drop the step and the engine
    goes on with micro 8 x accumulation 4, ending where a micro-8 run from the start ends."""
    common = [DS, "backend.zero_stage=1", f"data.cache_dir={data_cache}"]
    clean = _run([*common, "micro_batch=8"], tmp_path, "clean")
    hit = _run(common, tmp_path, "oom", env={"LAUNCHER_TEST_OOM": "1:2:8"})
    assert [m for m in read_metrics(hit) if m.get("event") == "out_of_memory"] == [
        {"event": "out_of_memory", "step": 2, "samples": 128, "ranks": [1], "micro_batch": 8}
        | {"accumulation": 4}  # step 2 starts after 2 x 64 samples: they are rerun
    ]
    config = json.loads((hit / "ds_config.json").read_text())
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (
        8,
        4,
    )
    _assert_same_training(hit, clean)


@pytest.mark.slow
def test_the_accelerate_backend_never_imports_deepspeed(tmp_path, data_cache):
    """Importing DeepSpeed costs seconds: only backend=deepspeed may pay for it."""
    args = [*RUN_ARGS, f"data.cache_dir={data_cache}", "run_dir=r"]
    code = (
        "import sys; from launcher.cli import main; code = main(sys.argv[1:]); "
        "sys.exit(code or ('deepspeed' in sys.modules and 'deepspeed was imported'))"
    )
    res = run_process([sys.executable, "-c", code, *args], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "r" / "model_final.pt").exists()
