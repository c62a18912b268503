"""The launcher as a user runs it: exit codes, one-line errors, run-directory contents."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from tests.helpers import SMALL_DATA, checkout_copy, read_metrics, run_cli, run_process, train_here

BAD_INPUTS = [
    (
        ["+recipe=nope"],
        "recipe='nope': unknown; choose from cifar10, gpt_small, mnist1d, resnet50, resnet50_lars",
    ),
    (["model=transformer9"], "model='transformer9': unknown; choose from"),
    (["optim=rmsprop"], "optim='rmsprop': unknown; choose from"),
    (["optim.name=rmsprop"], "optim.name='rmsprop': must be one of"),
    (["global_batch=-8"], "global_batch=-8: must be > 0"),
    (["global_batch=abc"], "global_batch='abc': must be an integer"),
    (["global_batch=1.5"], "global_batch=1.5: must be an integer"),
    (["micro_batch=48"], "micro_batch=48: does not divide the per-device batch 512"),
    (["micro_batch=lots"], "micro_batch='lots': must be an integer or one of auto"),
    (["global_batch=500", "micro_batch=auto", "max_micro_batch=0"], "max_micro_batch=0"),
    (["no_such_key=1"], "Could not override 'no_such_key'"),
    (["recipe=resnet50"], "select a recipe with +recipe=NAME"),
    (["--fast"], "--fast: unknown option"),
    (["+recipe=resnet50"], "data.root is not set: point it at an ImageNet-style folder"),
    (
        ["data=synthetic", "data.input_shape=[3,8,8]"],
        "model.name='cnn1d': needs (channels, length)",
    ),
    (["cluster=a100x8"], "cluster='a100x8': expects 1 node(s) x 8 device(s) per node = 8, but"),
    (["-m", "global_batch=64,100", "micro_batch=64"], "micro_batch=64: does not divide"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_nothing_written(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("launcher: error: "), err
    assert message in err
    assert list(tmp_path.iterdir()) == []  # no run directory, no outputs/


@pytest.mark.slow
def test_bad_input_from_a_real_process_has_no_traceback(tmp_path):
    res = run_cli(["global_batch=1000", "cluster=h100x256", "plan_only=true"], tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert res.stderr.strip().splitlines() == [
        "launcher: error: global_batch=1000: not divisible by the world size 256 (remainder 232); "
        "nearest valid: 768 or 1024"
    ]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_plan_only_goyal_on_256_devices_writes_config_and_plan_only(tmp_path):
    run_dir = tmp_path / "plan"
    res = run_cli(
        [
            "+recipe=resnet50",
            "global_batch=8192",
            "plan_only=true",
            "cluster=h100x256",
            f"run_dir={run_dir}",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == [".hydra", "config.yaml", "launcher.log", "plan.json"]  # and Hydra's record
    recorded = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    assert recorded == [
        "+recipe@_global_=resnet50",
        "global_batch=8192",
        "plan_only=true",
        "cluster=h100x256",
    ]
    plan = json.loads((run_dir / "plan.json").read_text())
    assert (plan["world_size"], plan["micro_batch"], plan["accumulation"]) == (256, 32, 1)
    assert plan["lr"] == pytest.approx(3.2) and plan["optimizer"] == "sgd"
    assert plan["warmup_samples"] == 5 * 1281167
    assert plan["memory"]["source"] == "estimated" and plan["memory"]["cap"] >= 32
    assert "3.2 = 0.1 x 8192/256, linear rule" in res.stdout
    for row in ("micro_batch", "accumulation", "warmup_samples", "optimizer"):
        assert row in res.stdout


@pytest.mark.slow
def test_plan_only_with_a_cached_estimate_does_not_import_dynamo(tmp_path):
    """Start-up (bench/startup.py): the first plan_only traces the model with FakeTensorMode,
    which imports torch._dynamo (~1.3 s); a second one with the same model reads the cached
    estimate and must not import it, nor a third with a fixed micro-batch, whose fit check the
    cached estimate's fake steps made (another dtype is checked again)."""
    cmd = [sys.executable, "-X", "importtime", "-m", "launcher", "plan_only=true"]
    cmd.append(f"memory.cache_dir={tmp_path / 'mem'}")
    first = run_process([*cmd, "run_dir=a"], tmp_path)
    second = run_process([*cmd, "run_dir=b", "global_batch=256"], tmp_path)
    fixed = run_process([*cmd, "run_dir=c", "micro_batch=64"], tmp_path)
    other = run_process([*cmd, "run_dir=d", "micro_batch=64", "trainer.dtype=float64"], tmp_path)
    for done in (first, second, fixed, other):
        assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"\|\s+torch\._dynamo\n", first.stderr)  # what the check sees when it happens
    assert "torch._dynamo" not in second.stderr and "torch._dynamo" not in fixed.stderr
    assert re.search(r"\|\s+torch\._dynamo\n", other.stderr)  # not cached: checked again
    plans = [json.loads((tmp_path / d / "plan.json").read_text()) for d in "ab"]
    assert plans[0]["memory"]["lines"] == plans[1]["memory"]["lines"]
    assert "from cache entry" in plans[1]["memory"]["note"]


@pytest.mark.slow
def test_plan_only_lars_above_8k_and_multirun(tmp_path):
    res = train_here(
        ["-m", "+recipe=resnet50", "global_batch=8192,32768", "plan_only=true", "cluster=h100x256"],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    plans = sorted((tmp_path / "outputs" / "resnet50").glob("multirun-*/*/plan.json"))
    assert len(plans) == 2
    by_batch = {p["global_batch"]: p for p in (json.loads(f.read_text()) for f in plans)}
    assert by_batch[8192]["optimizer"] == "sgd"
    assert by_batch[32768]["optimizer"] == "lars" and by_batch[32768]["decay"] == "poly"
    assert by_batch[32768]["micro_batch"] == 128 and by_batch[32768]["lr"] == pytest.approx(12.8)


def test_explicit_run_dir_holding_a_run_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["plan_only=true", "run_dir=r"]) == 0
    before = (tmp_path / "r" / "plan.json").read_text()
    assert main(["plan_only=true", "run_dir=r", "global_batch=64"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "r" / "plan.json").read_text() == before


@pytest.mark.slow
def test_default_run_shortened_reaches_90_percent(tmp_path, data_cache):
    """`python -m launcher` (full MNIST-1D, global batch 512), cut to 8 epochs."""
    res = run_cli([f"data.cache_dir={data_cache}", "trainer.epochs=8", "run_dir=run"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = tmp_path / "run"
    assert res.stdout.index("batch plan") < res.stdout.index("test accuracy")
    metrics = read_metrics(run_dir)
    final_eval = [m for m in metrics if "eval_accuracy" in m][-1]
    assert final_eval["eval_accuracy"] >= 0.90
    assert final_eval["eval_samples"] == 8000
    train_lines = [m for m in metrics if "loss" in m]
    assert train_lines[-1]["samples"] == 500 * 512  # ceil(8 x 32,000 / 512) steps, exact
    assert all({"step", "samples", "loss", "lr"} <= m.keys() for m in train_lines)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "config.yaml").exists() and (run_dir / "model_final.pt").exists()


@pytest.mark.slow
def test_resnet_recipe_trains_on_synthetic_data(tmp_path):
    """The torchvision path end to end (ResNet-18 on tiny synthetic images, accumulation 2)."""
    res = train_here(
        [
            "+recipe=resnet50",
            "data=synthetic",
            "model.arch=resnet18",
            "data.train_samples=32",
            "data.eval_samples=8",
            "data.input_shape=[3,32,32]",
            "data.num_classes=10",
            "data.workers=0",
            "global_batch=16",
            "micro_batch=8",
            "trainer.epochs=1",
            "run_dir=run",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert (plan["micro_batch"], plan["accumulation"], plan["steps"]) == (8, 2, 2)
    assert "test accuracy" in res.stdout


@pytest.mark.slow
def test_multirun_trains_each_job_in_its_own_run_dir(tmp_path, data_cache):
    res = train_here(
        [
            "-m",
            "global_batch=32,64",
            *SMALL_DATA,
            f"data.cache_dir={data_cache}",
            "trainer.epochs=0.4",
            "trainer.progress=false",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("test accuracy") == 2
    runs = sorted((tmp_path / "outputs" / "mnist1d").glob("multirun-*/*"))
    assert [r.name for r in runs] == ["0", "1", "multirun.yaml"]  # Hydra's sweep record too
    runs = runs[:2]
    for run, batch in zip(runs, (32, 64), strict=True):
        assert json.loads((run / "plan.json").read_text())["global_batch"] == batch
        assert read_metrics(run)[-1]["step"] == 640 // batch  # 0.4 x 1,600 samples
        assert (run / "model_final.pt").exists()


def test_sweep_over_backend_settings_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["-m", "backend.mixed_precision=no,bf16"]) == 2
    assert "cannot vary backend" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_sweep_with_explicit_run_dir_gets_one_folder_per_job(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["-m", "plan_only=true", "run_dir=sweep", "global_batch=64,128"]) == 0
    batches = [json.loads((tmp_path / "sweep" / j / "plan.json").read_text()) for j in "01"]
    assert [p["global_batch"] for p in batches] == [64, 128]


def _image_folder(root: Path, per_class: int) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for label, color in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (40 + i, 36), color).save(folder / f"{i}.png")


@pytest.mark.slow
def test_resnet_recipe_trains_on_an_image_folder(tmp_path):
    """torchvision ImageFolder + transforms + ResNet-18; the epoch is counted from the folder."""
    _image_folder(tmp_path / "imgs", per_class=8)
    common = ["+recipe=resnet50", f"data.root={tmp_path / 'imgs'}", "model.arch=resnet18"]
    common += ["data.image_size=32", "data.workers=0", "global_batch=8", "trainer.epochs=1"]
    res = train_here([*common, "data.num_classes=2", "run_dir=run"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert (plan["epoch_samples"], plan["steps"]) == (16, 2)
    final_eval = [m for m in read_metrics(tmp_path / "run") if "eval_accuracy" in m][-1]
    assert final_eval["eval_samples"] == 16
    wrong = train_here([*common, "data.num_classes=1000", "run_dir=run2"], tmp_path)
    assert wrong.returncode == 2 and not (tmp_path / "run2").exists()
    assert "data.num_classes=1000: " in wrong.stderr and "has 2 class folders" in wrong.stderr


def test_image_folder_without_train_split_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs" / "val").mkdir(parents=True)
    assert main(["+recipe=resnet50", "data.root=imgs"]) == 2
    assert "data.root='imgs': no train/ folder inside" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["imgs"]


@pytest.mark.slow
def test_measured_memory_caps_the_micro_batch_and_is_cached(tmp_path, data_cache):
    """A 1 MiB budget fits ~170 samples of the CNN: micro 128 x 4; the second launch reuses it."""
    args = [*SMALL_DATA, f"data.cache_dir={data_cache}", "trainer.epochs=0.64"]
    args += ["memory.budget_gb=0.001", "memory.margin_gb=0", f"memory.cache_dir={tmp_path}/mem"]
    plans = []
    for run in ("first", "second"):
        res = train_here([*args, f"run_dir={run}"], tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        plans.append(json.loads((tmp_path / run / "plan.json").read_text()))
    first, second = plans
    assert (first["micro_batch"], first["accumulation"]) == (128, 4)
    assert first["memory"]["source"] == "measured" and first["memory"]["probe_steps"] == 3
    assert second["memory"]["source"] == "cached" and second["memory"]["probe_steps"] == 0
    assert second["memory"]["cap"] == first["memory"]["cap"]
    assert 128 <= first["memory"]["cap"] < 256  # so 128 is the largest divisor of 512 that fits
    assert (second["micro_batch"], second["accumulation"]) == (128, 4)


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["plan_only=true"], "memory: one sample needs"),  # the estimate's step
        ([], "memory: model='cnn1d' with data='synthetic' does not fit even at micro-batch 1"),
    ],
)
def test_a_budget_below_one_sample_is_refused(extra, said, tmp_path, monkeypatch, capsys):
    """A run refuses before it builds the model (its weights, gradients and momentum alone are
    more than 10 KiB); plan_only by its estimated step."""
    monkeypatch.chdir(tmp_path)
    args = ["data=synthetic", "data.input_shape=[1,40]", "data.num_classes=10", *extra]
    args += ["memory.budget_gb=0.00001", "memory.margin_gb=0", "memory.cache_dir=mem"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"launcher: error: {said}") and err.count("\n") == 1
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_a_checkout_runs_with_its_own_config_whatever_is_installed(tmp_path):
    """`python -m launcher` inside a checkout imports that checkout's launcher/ (first on
    sys.path) and composes from that checkout's conf/ and recipes/, not an installed copy's."""
    from launcher.config.resources import source_tree

    assert source_tree() == Path(__file__).resolve().parent.parent
    checkout = checkout_copy(tmp_path / "checkout")
    (checkout / "recipes" / "only_here.yaml").write_text("# @package _global_\nglobal_batch: 64\n")
    env = {"PYTHONPATH": ""}  # nothing but the working directory puts launcher/ on the path
    helped = run_process([sys.executable, "-m", "launcher", "--help"], checkout, env=env)
    assert helped.returncode == 0, helped.stderr
    assert "only_here" in helped.stdout
    shown = run_process(
        [sys.executable, "-m", "launcher", "+recipe=only_here", "--cfg", "job"], checkout, env=env
    )
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["global_batch"] == 64
