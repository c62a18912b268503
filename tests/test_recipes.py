"""The workload recipes (resnet50, resnet50_lars, gpt_small, cifar10) and what they stand on:
byte-level text data, the CIFAR-10 python format, ImageFolder on real JPEGs, the GPT model, the
per-sample loss for sequences, device-dependent `auto` settings and the opt-in trackers."""

from __future__ import annotations

import json
import math
import os
import pickle
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from launcher.cli import main
from launcher.config.compose import compose_run
from launcher.data import build_splits, declared_epoch_samples
from launcher.errors import ConfigError
from launcher.training.loss import CrossEntropy
from tests.helpers import SMALL_DATA, composed, read_metrics, run_cli

TINY_GPT = ["model.layers=2", "model.width=32", "model.heads=2", "data.seq_len=16"]
QUIET = ["trainer.progress=false", "trainer.tensorboard=false"]


def _text_cfg(tmp_path: Path, *overrides: str):
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    return compose_run(["+recipe=gpt_small", cache, *overrides]).data


def _corpus(path: Path, n: int, seed: int = 0) -> bytes:
    words = ["alpha", "beta", "gamma", "delta", "the", "batch", "token", "é"]
    rng = np.random.default_rng(seed)
    text = " ".join(words[i] for i in rng.integers(len(words), size=n)).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text)
    return text


# ------------------------------------------------------------------------------------ text data
def test_text_file_is_cut_into_overlapping_sequences_with_the_tail_held_out(tmp_path):
    text = _corpus(tmp_path / "c.txt", 500)
    cfg = _text_cfg(tmp_path, f"data.path={tmp_path / 'c.txt'}", "data.seq_len=16")
    splits = build_splits(cfg)
    n_eval = int(len(text) * 0.05)
    train_bytes, eval_bytes = text[: len(text) - n_eval], text[len(text) - n_eval :]
    assert len(splits.train) == (len(train_bytes) - 1) // 16
    assert len(splits.eval) == (len(eval_bytes) - 1) // 16
    assert declared_epoch_samples(cfg)[0] == len(splits.train)  # stat only, no reading
    idx = np.array([0, 5, len(splits.train) - 1])
    x, y = splits.train[idx]
    assert x.dtype == torch.int64 and x.shape == y.shape == (3, 16)
    for row, i in enumerate(idx):
        window = list(train_bytes[i * 16 : i * 16 + 17])
        assert x[row].tolist() == window[:16] and y[row].tolist() == window[1:]
    ex, ey = splits.eval[np.arange(len(splits.eval))]
    assert ex[0].tolist() == list(eval_bytes[:16])  # no byte of the eval tail is trained on
    assert splits.spec.tokens and splits.spec.input_shape == (16,)
    assert splits.spec.num_classes == 256
    with pytest.raises(IndexError):
        splits.train[np.array([len(splits.train)])]


def test_text_folder_is_read_in_sorted_order_and_cached(tmp_path):
    folder = tmp_path / "corpus"
    parts = [_corpus(folder / name, 200, seed) for seed, name in enumerate(["b.txt", "a/z.txt"])]
    (folder / "skip.md").write_text("not matched by the default glob")
    cfg = _text_cfg(tmp_path, f"data.path={folder}", "data.seq_len=8")
    splits = build_splits(cfg)
    stream = parts[1] + parts[0]  # a/z.txt sorts before b.txt
    assert len(splits.train) == (len(stream) - int(len(stream) * 0.05) - 1) // 8
    assert splits.train[np.array([0])][0][0].tolist() == list(stream[:8])
    cached = list((tmp_path / "cache").glob("text-*.bin"))
    assert len(cached) == 1 and cached[0].read_bytes() == stream  # skip.md left out
    again = build_splits(cfg)  # the cached stream, memory-mapped
    assert np.array_equal(np.asarray(again.train.data), np.asarray(splits.train.data))
    _corpus(folder / "b.txt", 201, seed=5)  # a changed file: a new stream
    build_splits(cfg)
    assert len(list((tmp_path / "cache").glob("text-*.bin"))) == 2


def test_default_corpus_is_the_standard_library_without_site_packages(tmp_path):
    from launcher.data.text import corpus

    cfg = _text_cfg(tmp_path)
    c = corpus(cfg)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert c.root == stdlib and (stdlib / "os.py") in c.files
    assert all(f.suffix == ".py" for f in c.files) and c.files == tuple(sorted(c.files))
    assert not any({"site-packages", "dist-packages"} & set(f.parts) for f in c.files)
    samples, source = declared_epoch_samples(cfg)
    assert samples == (c.bytes - int(c.bytes * 0.05) - 1) // 256 and samples > 10_000
    assert f"{len(c.files):,} file(s)" in source


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.path=/no/such/corpus"], "data.path='/no/such/corpus': no such file or folder"),
        (["data.path=.", "data.glob=**/*.nothing"], "data.glob='**/*.nothing': no file matches"),
        (["data.path=c.txt", "data.seq_len=100000"], "data.seq_len=100000: the corpus"),
        (["data.path=empty.txt"], "data.seq_len=256: the corpus (0 bytes)"),
        (["data.eval_fraction=1.5"], "data.eval_fraction=1.5: must be in (0, 1)"),
        (["model.width=30", "model.heads=4"], "model.width=30: must be a positive multiple of"),
    ],
)
def test_bad_text_and_gpt_settings_are_one_line_exit_2(
    overrides, message, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    _corpus(tmp_path / "c.txt", 300)
    (tmp_path / "empty.txt").write_bytes(b"")
    for plan_only in ("true", "false"):  # planning, and building the data to train
        assert main(["+recipe=gpt_small", *overrides, f"plan_only={plan_only}", "run_dir=r"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "empty.txt"]


# -------------------------------------------------------------------------------- model and loss
def test_gpt_is_causal_and_checkpointing_does_not_change_gradients():
    from launcher.data import DataSpec
    from launcher.models import build_model

    compose = compose_run(["+recipe=gpt_small", *TINY_GPT])
    spec = DataSpec((16,), 256, tokens=True)
    torch.manual_seed(0)
    model = build_model(compose.model, spec).double()
    x = torch.randint(256, (3, 16))
    changed = x.clone()
    changed[:, 9:] = torch.randint(256, (3, 7))
    for mode in (model.train, model.eval):
        mode()
        with torch.no_grad():
            a, b = model(x), model(changed)
        assert a.shape == (3, 16, 256)
        assert torch.equal(a[:, :9], b[:, :9])  # position t sees tokens <= t only
        assert not torch.allclose(a[:, 9:], b[:, 9:])
    model.train()
    ckpt_cfg = compose_run(["+recipe=gpt_small", *TINY_GPT, "model.activation_checkpointing=true"])
    torch.manual_seed(0)
    ckpt = build_model(ckpt_cfg.model, spec).double()
    assert ckpt.state_dict().keys() == model.state_dict().keys()
    grads = []
    for m in (model, ckpt):
        m.zero_grad()
        CrossEntropy().sum(m(x), x).backward()
        grads.append([p.grad for p in m.parameters()])
    for g, h in zip(*grads, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-12, atol=1e-14)
    assert model.head.weight is model.tokens.weight  # tied: one parameter
    assert len(list(model.parameters())) == len({id(p) for p in model.parameters()})


def test_sequence_loss_is_the_per_sample_mean_over_positions_and_smoothing_matches():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 7, generator=g, dtype=torch.float64)
    y = torch.randint(7, (4, 5), generator=g)
    per_sample = [
        F.cross_entropy(logits[i], y[i]) for i in range(4)
    ]  # independent: each sequence's mean over its positions
    torch.testing.assert_close(CrossEntropy().sum(logits, y), sum(per_sample), rtol=1e-12, atol=0)
    eps = 0.1  # smoothed target: (1 - eps) one-hot + eps / classes
    logp = logits.log_softmax(-1)
    manual = -((1 - eps) * logp.gather(-1, y[..., None]).squeeze(-1) + eps * logp.mean(-1))
    torch.testing.assert_close(
        CrossEntropy(eps).sum(logits, y), manual.mean(1).sum(), rtol=1e-12, atol=0
    )
    flat = logits[:, 0]  # class labels: the plain sum
    torch.testing.assert_close(
        CrossEntropy().sum(flat, y[:, 0]),
        F.cross_entropy(flat, y[:, 0], reduction="sum"),
        rtol=0,
        atol=0,
    )
    correct, predictions, total, count = CrossEntropy().eval_counts(logits, y).tolist()
    assert count == predictions == 20 and correct == (logits.argmax(-1) == y).sum().item()
    assert total == pytest.approx(float(sum(per_sample)) * 5, rel=1e-12)


# ------------------------------------------------------------------------------------ CIFAR-10
def write_cifar10(root: Path, per_batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A stand-in in CIFAR-10's python on-disk format (random pixels, labels 0..9)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        entry = {"batch_label": name, "data": data, "labels": labels, "filenames": []}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        written[name] = (data, labels)
    names_meta = {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(names_meta, f, protocol=2)
    return written


def test_cifar10_reads_the_python_format_and_augments_only_training(tmp_path):
    written = write_cifar10(tmp_path / "c10", per_batch=6)
    cfg = compose_run(
        ["+recipe=cifar10", f"data.root={tmp_path / 'c10'}", "data.verify=false"]
    ).data
    splits = build_splits(cfg)
    assert (len(splits.train), len(splits.eval)) == (30, 6)
    data, labels = written["data_batch_2"]
    assert torch.equal(splits.train.images[6], torch.from_numpy(data[0]).reshape(3, 32, 32))
    assert splits.train.labels[6].item() == labels[0]
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2470, 0.2435, 0.2616])
    x, label = splits.eval[0]
    test_data, test_labels = written["test_batch"]
    expected = (torch.from_numpy(test_data[0]).reshape(3, 32, 32) / 255 - mean[:, None, None]) / (
        std[:, None, None]
    )
    torch.testing.assert_close(x, expected)
    assert label == test_labels[0]
    torch.manual_seed(0)
    crops = [splits.train[0][0] for _ in range(8)]
    assert any(not torch.equal(crops[0], c) for c in crops[1:])  # random crop/flip per call
    assert all(c.shape == (3, 32, 32) for c in crops)


def test_cifar10_download_goes_through_torchvision_once(tmp_path, monkeypatch):
    """data.download=true asks torchvision's CIFAR10 (here a stand-in that writes the files, as the
    real one does after its MD5 checks) only when the folder is missing."""
    import torchvision.datasets

    calls = []

    def fake_cifar10(root, train, download):
        calls.append((root, train, download))
        write_cifar10(Path(root), per_batch=2)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10)
    args = ["+recipe=cifar10", f"data.root={tmp_path / 'c'}", "data.download=true"]
    cfg = compose_run([*args, "data.verify=false"])  # the stand-in is not the official file
    assert len(build_splits(cfg.data).train) == 10
    assert len(build_splits(cfg.data).train) == 10
    assert calls == [(str(tmp_path / "c"), True, True)]


def test_cifar10_missing_or_malformed_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["+recipe=cifar10", "data.root=nowhere", "run_dir=run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.root='nowhere': no cifar-10-batches-py/ inside; data.download=true" in err
    write_cifar10(tmp_path / "bad", per_batch=2)
    with open(tmp_path / "bad" / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, f)
    with pytest.raises(ConfigError, match=r"test_batch holds data of shape \(2, 100\)"):
        build_splits(compose_run(["+recipe=cifar10", "data.root=bad", "data.verify=false"]).data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


class _Payload:
    """What a crafted batch file would carry: a call made while it is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("verify", [True, False])
def test_a_crafted_cifar10_file_never_runs_code(verify, tmp_path):
    """A data_batch_1 that would run a command when unpickled: refused by its MD5 (the default),
    and without the MD5 check by the unpickler, which gives the files numpy arrays only."""
    write_cifar10(tmp_path / "c10", per_batch=2)
    marker = tmp_path / "pwned"
    entry = {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1], "x": _Payload(marker)}
    with open(tmp_path / "c10" / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump(entry, f, protocol=2)
    args = [
        "+recipe=cifar10",
        f"data.root={tmp_path / 'c10'}",
        f"data.verify={str(verify).lower()}",
    ]
    message = "its MD5 differs" if verify else "it asks for posix.system, which data never needs"
    with pytest.raises(ConfigError, match=message):
        build_splits(compose_run(args).data)
    assert not marker.exists()


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
    _corpus(tmp_path / "c.txt", 3000)
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
    _corpus(tmp_path / "c.txt", 2000)
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
    _corpus(tmp_path / "c.txt", 300)
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
    res = run_cli([*args, "run_dir=run", *QUIET], tmp_path)
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


# -------------------------------------------------------------------------------------- trackers
@pytest.mark.slow
def test_mlflow_tracker_gets_the_same_metrics_as_metrics_jsonl(tmp_path):
    pytest.importorskip("mlflow")
    store = tmp_path / "mlruns"
    env = {"MLFLOW_TRACKING_URI": store.as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}
    args = ["data.num_samples=1000", "global_batch=100", "trainer.epochs=0.5"]
    args += ["trainer.log_every=1", "trainer.trackers=[mlflow]", "run_dir=run", *QUIET]
    res = run_cli(args, tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    losses = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "run") if "loss" in m}
    runs = [p for p in store.glob("*/*") if (p / "metrics").is_dir()]
    assert len(runs) == 1
    logged = {}
    for line in (runs[0] / "metrics" / "loss").read_text().splitlines():
        _, value, step = line.split()
        logged[int(step)] = float(value)
    assert logged == pytest.approx(losses, rel=1e-12) and len(logged) == 4
    params = runs[0] / "params"
    assert (params / "global_batch").read_text() == "100"
    assert (params / "plan.micro_batch").read_text() == "100"
    assert (runs[0] / "tags" / "mlflow.runName").read_text() == "run"


def test_a_tracker_that_is_not_installed_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    monkeypatch.chdir(tmp_path)
    assert main(["trainer.trackers=[wandb]", "run_dir=run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "launcher: error: " + (
        "trainer.trackers=['wandb']: wandb is not installed; pip install wandb, or leave it out "
        "(TensorBoard needs nothing)"
    )
    assert list(tmp_path.iterdir()) == []
    assert main(["trainer.trackers=[neptune]", "run_dir=run"]) == 2
    assert "trainer.trackers[0]='neptune': must be one of wandb, mlflow" in capsys.readouterr().err
