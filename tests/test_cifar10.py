"""The CIFAR-10 python format: reading, augmentation, the torchvision download, bad files in
one line, and a crafted file that never runs code."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher.cli import main
from launcher.config.compose import compose_run
from launcher.data import build_splits
from launcher.errors import ConfigError
from tests.helpers import write_cifar10


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
