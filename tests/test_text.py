"""Sequence data and models: byte-level text (files, folders, the standard-library corpus),
the GPT model (causal, activation checkpointing) and the per-sample loss over positions."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from launcher.cli import main
from launcher.config.compose import compose_run
from launcher.data import build_splits, declared_epoch_samples
from launcher.models.loss import CrossEntropy
from tests.helpers import write_corpus

TINY_GPT = ["model.layers=2", "model.width=32", "model.heads=2", "data.seq_len=16"]
QUIET = ["trainer.progress=false", "trainer.tensorboard=false"]


def _text_cfg(tmp_path: Path, *overrides: str):
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    return compose_run(["+recipe=gpt_small", cache, *overrides]).data


# ------------------------------------------------------------------------------------ text data
def test_text_file_is_cut_into_overlapping_sequences_with_the_tail_held_out(tmp_path):
    text = write_corpus(tmp_path / "c.txt", 500)
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
    names = ["b.txt", "a/z.txt"]
    parts = [write_corpus(folder / name, 200, seed) for seed, name in enumerate(names)]
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
    write_corpus(folder / "b.txt", 201, seed=5)  # a changed file: a new stream
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
    write_corpus(tmp_path / "c.txt", 300)
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
