"""Noise-scale estimator on a synthetic problem where |G|^2 and tr(Sigma) are known exactly:
per-sample gradients g_i = G + e_i, e_i ~ N(0, diag(sigma^2))."""

from __future__ import annotations

import json
import math

import pytest
import torch

from launcher.batchsize.noise import NoiseScale, two_batch

DIM = 50
G = torch.linspace(-0.2, 0.3, DIM, dtype=torch.float64)
SIGMA = torch.linspace(0.5, 2.0, DIM, dtype=torch.float64)
GRADIENT_SQ = float(G.square().sum())  # 1.30...
TRACE = float(SIGMA.square().sum())  # 109.1...


def test_two_batch_is_exact_on_expected_norms() -> None:
    """E|G_B|^2 = |G|^2 + tr(Sigma)/B, so the expected norms give back both terms exactly."""
    for small, big in [(8, 64), (1, 2), (32, 4096)]:
        expected = [GRADIENT_SQ + TRACE / b for b in (small, big)]
        g, s = two_batch(expected[0], small, expected[1], big)
        assert g == pytest.approx(GRADIENT_SQ, rel=1e-12)
        assert s == pytest.approx(TRACE, rel=1e-12)
    with pytest.raises(ValueError, match="need 0 < small < big"):
        two_batch(1.0, 8, 1.0, 8)


def _step(gen: torch.Generator, micro: int, accumulation: int) -> tuple[float, float]:
    """Mean squared norm of the micro-batch gradients, squared norm of their mean."""
    noise = torch.randn(accumulation, micro, DIM, generator=gen, dtype=torch.float64) * SIGMA
    micro_means = G + noise.mean(dim=1)
    return float(micro_means.square().sum(1).mean()), float(micro_means.mean(0).square().sum())


def test_moving_averages_recover_the_noise_scale() -> None:
    """4,000 steps of micro 8 x accumulation 16 (B = 128): B_simple = tr(Sigma)/|G|^2 = 83.8
    within 2% (over seeds 0-7 the estimate deviates by -0.6% to +0.6%, spread 0.4%)."""
    gen = torch.Generator().manual_seed(0)
    scale = NoiseScale(beta=0.999)
    for _ in range(4000):
        small_sq, big_sq = _step(gen, 8, 16)
        scale.update(small_sq, 8, big_sq, 128)
    assert scale.trace == pytest.approx(TRACE, rel=0.02)
    assert scale.gradient_sq == pytest.approx(GRADIENT_SQ, rel=0.02)
    assert scale.value == pytest.approx(TRACE / GRADIENT_SQ, rel=0.02)


def test_decay_per_sample_weighs_a_step_by_its_batch() -> None:
    """The loop's decay exp(-B / window): ten steps of 100 samples age the average as much as
    two of 500, so the window is the same number of samples whatever the batch."""
    small, large = NoiseScale(), NoiseScale()
    for _ in range(10):
        small.update(2.0, 50, 1.5, 100, beta=math.exp(-100 / 400))
    for _ in range(2):
        large.update(2.0, 250, 1.5, 500, beta=math.exp(-500 / 400))
    assert small.state_dict()["weight"] == pytest.approx(1 - math.exp(-1000 / 400), rel=1e-12)
    assert large.state_dict()["weight"] == pytest.approx(small.state_dict()["weight"], rel=1e-12)


def test_no_estimate_before_the_gradient_term_is_positive() -> None:
    scale = NoiseScale(beta=0.9)
    assert scale.value is None
    scale.update(small_sq=1.0, small=8, big_sq=1.0, big=16)  # |G|^2 estimate 1.0, trace 0
    assert scale.value == 0.0
    scale = NoiseScale(beta=0.9)
    scale.update(small_sq=1.0, small=8, big_sq=0.1, big=16)  # |G|^2 estimate < 0: pure noise
    assert scale.gradient_sq < 0 and scale.value is None
    scale = NoiseScale(beta=0.0)
    scale.update(small_sq=0.5, small=8, big_sq=1.0, big=16)  # tr(Sigma) estimate < 0 -> 0
    assert scale.trace == 0.0 and scale.value == 0.0
    assert math.isclose(scale.gradient_sq, 1.5)


# --------------------------------------------------------------------------------------------
# the meter in the real loop: its first estimate against gradients computed here independently


def _reference(cfg_overrides: list[str], small_batches: list[slice]) -> tuple[float, float]:
    """two_batch(mean |g_small|^2, |g_global|^2) at the run's initial weights for its first
    global batch, the small batches given as slices of it; plain autograd, float64."""
    import torch.nn.functional as F

    from launcher.config.compose import compose_run
    from launcher.data import build_splits
    from launcher.data.sampler import epoch_permutation
    from launcher.models import build_model

    cfg = compose_run(cfg_overrides)
    splits = build_splits(cfg.data)
    torch.manual_seed(cfg.seed)  # what the run does before building its model
    model = build_model(cfg.model, splits.spec).to(torch.float64)
    index = epoch_permutation(len(splits.train), cfg.seed, 0)[: cfg.global_batch]
    x, y = splits.train.x[index].to(torch.float64), splits.train.y[index]

    def grad_sq(part: slice) -> float:
        model.zero_grad()
        F.cross_entropy(model(x[part]), y[part]).backward()
        return sum(float(p.grad.square().sum()) for p in model.parameters())

    small = sum(grad_sq(s) for s in small_batches) / len(small_batches)
    b = small_batches[0].stop - small_batches[0].start
    return two_batch(small, b, grad_sq(slice(None)), cfg.global_batch)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("devices", "extra", "mode", "small"),
    [
        (1, [], "split", [slice(0, 32)]),  # 64 run as 2 x 32 on step 0: the first half
        (1, ["micro_batch=16"], "micro", [slice(0, 16)]),  # 4 x 16: the first micro-batch
        (2, [], "rank", [slice(0, 32), slice(32, 64)]),  # each rank's 32 before the all-reduce
        # DDP reducing inside backward: each rank's first half (16) before the second's backward
        (2, ["trainer.oom_recovery=false"], "split", [slice(0, 16), slice(32, 48)]),
    ],
)
def test_meter_in_the_loop_matches_an_independent_computation(
    devices, extra, mode, small, tmp_path, data_cache
) -> None:
    """One step at global batch 64 (float64): the logged |G|^2 and tr(Sigma) (an EMA after one
    update is that update) equal two_batch on gradients computed here, within 1e-9."""
    from tests.helpers import SMALL_DATA, read_metrics, run_cli, train_here

    args = [*SMALL_DATA, f"data.cache_dir={data_cache}", "global_batch=64", "memory.probe=false"]
    run = train_here if devices == 1 else run_cli  # one process: this one
    res = run(
        [*args, "trainer.epochs=0.04", "trainer.dtype=float64", "trainer.log_every=1"]
        + ["trainer.progress=false", f"trainer.devices={devices}", *extra, "run_dir=run"],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert (plan["steps"], plan["noise"]) == (1, mode)
    (line,) = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    gradient_sq, trace = _reference(args, small)
    assert trace > 0 and gradient_sq > 0
    assert line["grad_sq"] == pytest.approx(gradient_sq, rel=1e-9)
    assert line["grad_trace"] == pytest.approx(trace, rel=1e-9)
    assert line["noise_scale"] == pytest.approx(trace / gradient_sq, rel=1e-9)
