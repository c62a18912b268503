"""The opt-in trackers (Weights & Biases, MLflow through Accelerate): the same metrics as
metrics.jsonl, and a tracker that is not installed refused in one line."""

from __future__ import annotations

import pytest

from launcher.cli import main
from tests.helpers import read_metrics, run_cli

TINY_GPT = ["model.layers=2", "model.width=32", "model.heads=2", "data.seq_len=16"]
QUIET = ["trainer.progress=false", "trainer.tensorboard=false"]


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
