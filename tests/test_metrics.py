"""TensorBoard output (launcher/training/metrics.py): tags grouped (train/, eval/, noise/, speed/,
...) and samples on the x axis, so runs at different global batches line up; a resume purges what
came after its checkpoint by samples."""

from __future__ import annotations

import pytest

from launcher.training.metrics import MetricsSink, tensorboard_tag


@pytest.mark.parametrize(
    ("key", "tag"),
    [
        ("loss", "train/loss"),
        ("lr", "train/lr"),
        ("eval_accuracy", "eval/accuracy"),
        ("eval_loss", "eval/loss"),
        ("noise_scale", "noise/noise_scale"),
        ("grad_sq", "noise/grad_sq"),
        ("samples_per_s", "speed/samples_per_s"),
        ("cuda_peak_bytes", "memory/cuda_peak_bytes"),
        ("param_digest", "run/param_digest"),
    ],
)
def test_tags(key, tag) -> None:
    assert tensorboard_tag(key) == tag


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_runs_at_two_batches_line_up_by_samples(tmp_path) -> None:
    for batch in (64, 256):
        (tmp_path / str(batch)).mkdir()
        sink = MetricsSink(tmp_path / str(batch), total_steps=8, tensorboard=True, progress=False)
        for step in range(1, 5):
            sink.log({"step": step, "samples": step * batch, "loss": 1.0 / step, "lr": 0.1})
        sink.log({"step": 4, "samples": 4 * batch, "eval_accuracy": 0.5, "eval_loss": 0.7})
        sink.log({"event": "checkpoint", "step": 4, "path": "x"})  # no samples: not a point
        sink.log({"final": True, "step": 4, "samples": 4 * batch, "cuda_peak_bytes": 1e9})
        sink.close()
    small, big = _scalars(tmp_path / "64"), _scalars(tmp_path / "256")
    assert set(small) == {
        "train/loss",
        "train/lr",
        "train/step",
        "eval/accuracy",
        "eval/loss",
        "memory/cuda_peak_bytes",  # the final record's: what training needed on CUDA
        "run/final",
    }
    assert [x for x, _ in small["train/loss"]] == [64, 128, 192, 256]
    assert [x for x, _ in big["train/loss"]] == [256, 512, 768, 1024]
    assert small["train/step"] == [(64 * s, float(s)) for s in range(1, 5)]
    assert big["eval/accuracy"] == [(1024, 0.5)]


def test_a_resume_purges_by_samples(tmp_path) -> None:
    sink = MetricsSink(tmp_path, total_steps=8, tensorboard=True, progress=False)
    for step in range(1, 7):
        sink.log({"step": step, "samples": 32 * step, "loss": float(step)})
    sink.close()
    again = MetricsSink(
        tmp_path,
        total_steps=8,
        tensorboard=True,
        progress=False,
        resume_step=3,
        resume_samples=96,
    )
    for step in range(4, 7):
        again.log({"step": step, "samples": 32 * step, "loss": 10.0 * step})
    again.close()
    loss = _scalars(tmp_path)["train/loss"]
    assert loss == [(32, 1.0), (64, 2.0), (96, 3.0), (128, 40.0), (160, 50.0), (192, 60.0)]
