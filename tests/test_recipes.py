"""The workload recipes (resnet50, resnet50_lars, gpt_small, cifar10) trained end to end, and
the device-dependent `auto` settings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from launcher.cli import main
from launcher.config.compose import compose_run
from launcher.data import build_splits
from tests.helpers import (
    SMALL_DATA,
    composed,
    read_metrics,
    run_cli,
    train_here,
    write_cifar10,
    write_corpus,
)

TINY_GPT = ["model.layers=2", "model.width=32", "model.heads=2", "data.seq_len=16"]
QUIET = ["trainer.progress=false", "trainer.tensorboard=false"]


def _text_cfg(tmp_path: Path, *overrides: str):
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    return compose_run(["+recipe=gpt_small", cache, *overrides]).data


# ----------------------------------------------------------------------- every recipe, trained
def _jpeg_folder(root: Path, per_class: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("n01", "n02", "n03"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(36 + 3 * i, 44, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.JPEG", format="JPEG")


def _plan(run: Path) -> dict:
    return json.loads((run / "plan.json").read_text())


@pytest.mark.slow
def test_resnet50_recipe_trains_on_a_folder_of_jpegs_with_loader_workers(tmp_path):
    """Goyal's recipe as it is (ResNet-50, SGD, step decay) on real JPEG files: RandomResizedCrop,
    flip, the eval resize/center-crop, two loader workers per split (eval workers persist)."""
    _jpeg_folder(tmp_path / "imgs", per_class=4)
    args = ["+recipe=resnet50", f"data.root={tmp_path / 'imgs'}", "data.num_classes=3"]
    args += ["data.image_size=32", "data.workers=2", "global_batch=6", "micro_batch=3"]
    args += ["trainer.epochs=2", "trainer.eval_every_epochs=1", "run_dir=run", *QUIET]
    res = run_cli(args, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    plan = _plan(tmp_path / "run")
    assert (plan["epoch_samples"], plan["steps"], plan["accumulation"]) == (12, 4, 2)
    assert plan["optimizer"] == "sgd" and plan["decay"] == "step"
    evals = [m for m in read_metrics(tmp_path / "run") if "eval_accuracy" in m]
    assert [m["eval_samples"] for m in evals] == [12, 12]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["backend"]["mixed_precision"] == "no"  # auto on a CPU
    assert saved["trainer"]["channels_last"] is False
    assert saved["model"]["arch"] == "resnet50"


@pytest.mark.slow
def test_resnet50_lars_recipe_trains_with_bf16_and_activation_checkpointing(tmp_path):
    """The MLPerf-style 32k recipe (LARS, poly 2, label smoothing 0.1), scaled down, with the two
    memory switches every recipe has."""
    args = ["+recipe=resnet50_lars", "data=synthetic", "model.arch=resnet18"]
    args += ["data.train_samples=16", "data.eval_samples=4", "data.input_shape=[3,32,32]"]
    args += ["data.num_classes=10", "data.workers=0", "global_batch=8", "micro_batch=4"]
    args += ["backend.mixed_precision=bf16", "model.activation_checkpointing=true"]
    args += ["trainer.epochs=1", "run_dir=run", *QUIET]
    res = run_cli(args, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    plan = _plan(tmp_path / "run")
    assert (plan["optimizer"], plan["decay"], plan["decay_power"]) == ("lars", "poly", 2.0)
    assert plan["lr"] == pytest.approx(31.2 * 8 / 32768) and plan["weight_decay"] == 5e-5
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["trainer"]["label_smoothing"] == 0.1
    losses = [m["loss"] for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert losses and all(math.isfinite(v) for v in losses)


@pytest.mark.slow
def test_gpt_recipe_trains_on_a_text_file_and_shows_tokens_per_batch(tmp_path):
    write_corpus(tmp_path / "c.txt", 3000)
    args = ["+recipe=gpt_small", f"data.path={tmp_path / 'c.txt'}", *TINY_GPT, "global_batch=16"]
    args += ["trainer.epochs=2", "run_dir=run", *QUIET, "trainer.log_every=1"]
    args += ["backend.mixed_precision=bf16", "model.activation_checkpointing=true"]
    res = run_cli(args, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    plan = _plan(tmp_path / "run")
    assert plan["sample_tokens"] == 16 and plan["optimizer"] == "adamw"
    row = next(line for line in res.stdout.splitlines() if line.startswith("tokens_per_batch"))
    assert row.split()[1:5] == ["256", "256", "=", "16"] and "x 16 tokens" in row
    metrics = read_metrics(tmp_path / "run")
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[0] == pytest.approx(math.log(256), rel=0.05)  # uniform over bytes at init
    assert losses[-1] < losses[0] - 1.0  # 8 words: the bytes are very predictable
    final = [m for m in metrics if "eval_accuracy" in m][-1]
    n_eval = int((tmp_path / "c.txt").stat().st_size * 0.05)
    assert final["eval_samples"] == (n_eval - 1) // 16  # sequences; accuracy is per token


@pytest.mark.slow
def test_gpt_with_its_tied_embedding_trains_the_same_under_deepspeed_zero3(tmp_path):
    """ZeRO 3 partitions parameters, and the GPT's output layer shares the token embedding: the
    final weights equal the Accelerate run's (float32, summation order only) and stay tied."""
    write_corpus(tmp_path / "c.txt", 2000)
    args = ["+recipe=gpt_small", f"data.path={tmp_path / 'c.txt'}", *TINY_GPT, "global_batch=16"]
    args += ["trainer.epochs=1", *QUIET]
    runs = {}
    for name, extra in (("acc", []), ("zero3", ["backend=deepspeed", "backend.zero_stage=3"])):
        res = run_cli([*args, *extra, f"run_dir={name}"], tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = torch.load(tmp_path / name / "model_final.pt")
    assert runs["acc"].keys() == runs["zero3"].keys()
    for key, value in runs["acc"].items():
        torch.testing.assert_close(runs["zero3"][key], value, rtol=0, atol=1e-5, msg=key)
    assert torch.equal(runs["zero3"]["head.weight"], runs["zero3"]["tokens.weight"])


@pytest.mark.slow
def test_gpt_recipe_switches_to_lamb_above_512_sequences(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "c.txt", 300)
    args = ["+recipe=gpt_small", "data.path=c.txt", *TINY_GPT, "global_batch=1024"]
    args += ["plan_only=true", "trainer.epochs=100"]  # a step no larger than the run
    assert main([*args, "run_dir=big"]) == 0
    plan = _plan(tmp_path / "big")
    assert (plan["optimizer"], plan["decay"], plan["decay_power"]) == ("lamb", "poly", 1.0)
    assert plan["lr"] == pytest.approx(1e-3 * math.sqrt(1024 / 64))
    assert plan["weight_decay"] == 0.01


@pytest.mark.slow
def test_cifar10_recipe_trains_on_a_stand_in_with_label_smoothing(tmp_path):
    write_cifar10(tmp_path / "c10", per_batch=4)
    args = ["+recipe=cifar10", f"data.root={tmp_path / 'c10'}", "data.workers=1"]
    args += [
        "data.verify=false",
        "global_batch=10",
        "trainer.epochs=1",
        "trainer.label_smoothing=0.1",
    ]
    args += ["run_dir=run", *QUIET, "trainer.log_every=1"]
    res = run_cli(args, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    plan = _plan(tmp_path / "run")
    assert (plan["epoch_samples"], plan["steps"], plan["lr"]) == (
        20,
        2,
        pytest.approx(0.1 * 10 / 128),
    )
    final = [m for m in read_metrics(tmp_path / "run") if "eval_accuracy" in m][-1]
    assert final["eval_samples"] == 4


@pytest.mark.slow
def test_label_smoothing_reaches_the_training_loss(tmp_path, data_cache):
    """The first logged loss of a run with trainer.label_smoothing=0.2 equals smoothed
    cross-entropy computed here, independently, on the same initial model and first global batch."""
    from launcher.data.sampler import epoch_permutation
    from launcher.models import build_model

    args = [*SMALL_DATA, f"data.cache_dir={data_cache}", "global_batch=64", "trainer.epochs=0.04"]
    args += ["trainer.dtype=float64", "trainer.label_smoothing=0.2", "trainer.log_every=1"]
    res = train_here([*args, "run_dir=run", *QUIET], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    logged = next(m["loss"] for m in read_metrics(tmp_path / "run") if m.get("step") == 1)
    cfg = composed(args)
    splits = build_splits(cfg.data)
    torch.manual_seed(cfg.seed)  # as job.py builds the model
    model = build_model(cfg.model, splits.spec).double()
    x, y = splits.train[epoch_permutation(len(splits.train), cfg.seed, 0)[:64]]
    with torch.no_grad():
        expected = F.cross_entropy(model(x.double()), y, label_smoothing=0.2).item()
        plain = F.cross_entropy(model(x.double()), y).item()
    assert logged == pytest.approx(expected, rel=1e-12) and abs(expected - plain) > 1e-3


# ---------------------------------------------------------------- device-dependent auto settings
def test_auto_precision_and_channels_last_follow_the_device(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["+recipe=resnet50", "plan_only=true", "memory.probe=false"]
    assert main([*base, "cluster=h100x256", "run_dir=gpu"]) == 0
    assert main([*base, "run_dir=cpu"]) == 0
    gpu = yaml.safe_load((tmp_path / "gpu" / "config.yaml").read_text())
    cpu = yaml.safe_load((tmp_path / "cpu" / "config.yaml").read_text())
    assert (gpu["backend"]["mixed_precision"], gpu["trainer"]["channels_last"]) == ("bf16", True)
    assert (cpu["backend"]["mixed_precision"], cpu["trainer"]["channels_last"]) == ("no", False)
    assert main([*base, "backend.mixed_precision=fp16", "cluster=h100x256", "run_dir=x"]) == 0
    fixed = yaml.safe_load((tmp_path / "x" / "config.yaml").read_text())
    assert fixed["backend"]["mixed_precision"] == "fp16"  # an explicit choice stays
