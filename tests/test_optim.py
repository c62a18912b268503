"""Tests for LARS and LAMB against float64 updates computed by hand with numpy."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from launcher.optim.lamb import LAMB
from launcher.optim.lars import LARS

MakeOpt = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
RTOL = 1e-12  # float64 throughout; reference and optimizer differ only in rounding order
STEPS = 4
LR, WD = 0.1, 0.05


def _setup() -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """Initial weight (3x4) and bias (4,), plus a distinct gradient pair for every step."""
    rng = np.random.default_rng(0)
    init = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    grads = [
        {k: rng.standard_normal(v.shape) * (t + 1) for k, v in init.items()} for t in range(STEPS)
    ]
    return init, grads


def _norm(x: np.ndarray) -> float:
    """Euclidean norm written out by hand."""
    return float(np.sqrt(np.sum(x * x)))


def _run(
    make_opt: MakeOpt, init: dict[str, np.ndarray], grads: list[dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Run the torch optimizer over the fixed gradients; weight adapts with wd, bias does not."""
    p = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in init.items()}
    opt = make_opt(
        [
            {"params": [p["w"]], "weight_decay": WD},
            {"params": [p["b"]], "weight_decay": 0.0, "adapt": False},
        ]
    )
    for g in grads:
        for k, t in p.items():
            t.grad = torch.tensor(g[k], dtype=torch.float64)
        opt.step()
    return {k: v.detach().numpy() for k, v in p.items()}


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_matches_hand_computation(nesterov: bool) -> None:
    """LARS on two groups for 4 steps equals the hand-written update."""
    init, grads = _setup()
    mom, tc = 0.9, 0.02
    cfg = {"w": (WD, True), "b": (0.0, False)}
    p = {k: v.copy() for k, v in init.items()}
    buf: dict[str, np.ndarray] = {}
    for g in grads:
        for k, (wd, adapt) in cfg.items():
            d = g[k] + wd * p[k]
            if adapt:
                wn, gn = _norm(p[k]), _norm(g[k])
                d = d * (tc * wn / (gn + wd * wn))
            buf[k] = d.copy() if k not in buf else mom * buf[k] + d
            d = d + mom * buf[k] if nesterov else buf[k]
            p[k] = p[k] - LR * d
    got = _run(
        lambda ps: LARS(ps, lr=LR, momentum=mom, trust_coefficient=tc, nesterov=nesterov),
        init,
        grads,
    )
    for k, want in p.items():
        assert not np.allclose(want, init[k])
        np.testing.assert_allclose(got[k], want, rtol=RTOL, atol=0)


def test_lamb_matches_hand_computation() -> None:
    """LAMB on two groups for 4 steps equals the hand-written update."""
    init, grads = _setup()
    b1, b2, eps = 0.8, 0.95, 1e-6
    cfg = {"w": (WD, True), "b": (0.0, False)}
    p = {k: v.copy() for k, v in init.items()}
    m = {k: np.zeros_like(v) for k, v in init.items()}
    v = {k: np.zeros_like(x) for k, x in init.items()}
    for t, g in enumerate(grads, start=1):
        for k, (wd, adapt) in cfg.items():
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] * g[k]
            mhat, vhat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
            u = mhat / (np.sqrt(vhat) + eps) + wd * p[k]
            trust = _norm(p[k]) / _norm(u) if adapt else 1.0
            p[k] = p[k] - LR * trust * u
    got = _run(lambda ps: LAMB(ps, lr=LR, betas=(b1, b2), eps=eps), init, grads)
    for k, want in p.items():
        assert not np.allclose(want, init[k])
        np.testing.assert_allclose(got[k], want, rtol=RTOL, atol=0)


def _one_step(
    opt_cls: type[torch.optim.Optimizer], param: torch.Tensor, grad: torch.Tensor, **kw: float
) -> torch.Tensor:
    """Apply one step of ``opt_cls`` to a float64 leaf and return the new value."""
    p = param.clone().to(torch.float64).requires_grad_(True)
    p.grad = grad.to(torch.float64)
    opt_cls([p], lr=LR, **kw).step()
    return p.detach()


def test_trust_is_one_for_zero_weight() -> None:
    """A zero-initialised param takes the plain (trust 1) step instead of staying at zero."""
    g = torch.tensor([[0.3, -1.2], [2.0, 0.5]])
    lars = _one_step(LARS, torch.zeros(2, 2), g, weight_decay=WD, trust_coefficient=0.001)
    torch.testing.assert_close(lars, -LR * g.double(), rtol=RTOL, atol=0)
    lamb = _one_step(LAMB, torch.zeros(2, 2), g, eps=0.0, weight_decay=WD)
    # first step with eps=0: mhat/sqrt(vhat) = sign(g)
    torch.testing.assert_close(lamb, -LR * torch.sign(g).double(), rtol=RTOL, atol=0)


def test_trust_is_one_for_zero_grad() -> None:
    """A zero gradient gives trust 1 (LARS decays by lr*wd*p; LAMB stays put without NaN)."""
    w = torch.tensor([1.5, -2.0, 0.5], dtype=torch.float64)
    lars = _one_step(LARS, w, torch.zeros(3), weight_decay=WD, trust_coefficient=0.001)
    torch.testing.assert_close(lars, w - LR * WD * w, rtol=RTOL, atol=0)
    lars_nowd = _one_step(LARS, w, torch.zeros(3), weight_decay=0.0)
    torch.testing.assert_close(lars_nowd, w, rtol=0, atol=0)
    lamb = _one_step(LAMB, w, torch.zeros(3), weight_decay=0.0)
    torch.testing.assert_close(lamb, w, rtol=0, atol=0)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: LARS(ps, lr=LR, momentum=0.9, weight_decay=WD, nesterov=True),
        lambda ps: LAMB(ps, lr=LR, betas=(0.8, 0.9), weight_decay=WD),
    ],
    ids=["lars", "lamb"],
)
def test_state_dict_round_trip_continues_identically(make_opt: MakeOpt) -> None:
    """Reloading the state mid-way into a fresh optimizer gives bit-identical params."""
    init, grads = _setup()
    grads = grads + grads[::-1]

    def fresh(
        values: dict[str, torch.Tensor],
    ) -> tuple[dict[str, torch.Tensor], torch.optim.Optimizer]:
        """Leaf float64 copies of ``values`` and a new optimizer over them."""
        p = {k: v.clone().double().requires_grad_(True) for k, v in values.items()}
        return p, make_opt([{"params": [p["w"]]}, {"params": [p["b"]], "adapt": False}])

    def steps(p: dict[str, torch.Tensor], opt: torch.optim.Optimizer, gs: list) -> None:
        """Apply the gradients ``gs`` one step at a time."""
        for g in gs:
            for k, t in p.items():
                t.grad = torch.tensor(g[k], dtype=torch.float64)
            opt.step()

    start = {k: torch.tensor(v) for k, v in init.items()}
    ref, ref_opt = fresh(start)
    steps(ref, ref_opt, grads)
    half, half_opt = fresh(start)
    steps(half, half_opt, grads[:3])
    blob = io.BytesIO()
    torch.save(half_opt.state_dict(), blob)
    blob.seek(0)
    resumed, resumed_opt = fresh({k: v.detach() for k, v in half.items()})
    resumed_opt.load_state_dict(torch.load(blob))
    steps(resumed, resumed_opt, grads[3:])
    for k in ref:
        assert torch.equal(resumed[k], ref[k]), k
    # without the saved state the continuation must differ, so the check above has teeth
    cold, cold_opt = fresh({k: v.detach() for k, v in half.items()})
    steps(cold, cold_opt, grads[3:])
    assert not torch.equal(cold["w"], ref["w"])


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda ps: LARS(ps, lr=-0.1), "lr"),
        (lambda ps: LARS(ps, lr=0.1, momentum=-0.5), "momentum"),
        (lambda ps: LARS(ps, lr=0.1, weight_decay=-1e-4), "weight_decay"),
        (lambda ps: LARS(ps, lr=0.1, trust_coefficient=0.0), "trust_coefficient"),
        (lambda ps: LARS(ps, lr=0.1, momentum=0.0, nesterov=True), "momentum"),
        (lambda ps: LARS(ps, lr=0.1, eps=-1.0), "eps"),
        (lambda ps: LAMB(ps, lr=-1e-3), "lr"),
        (lambda ps: LAMB(ps, lr=1e-3, betas=(1.0, 0.999)), r"betas\[0\]"),
        (lambda ps: LAMB(ps, lr=1e-3, betas=(0.9, -0.1)), r"betas\[1\]"),
        (lambda ps: LAMB(ps, lr=1e-3, eps=-1e-8), "eps"),
        (lambda ps: LAMB(ps, lr=1e-3, weight_decay=-0.01), "weight_decay"),
    ],
)
def test_invalid_arguments_raise(make: MakeOpt, name: str) -> None:
    """Each bad hyperparameter raises ValueError naming the argument."""
    with pytest.raises(ValueError, match=name):
        make([torch.zeros(2, requires_grad=True)])


@pytest.mark.parametrize("opt_cls", [LARS, LAMB])
def test_closure_none_grad_and_sparse(opt_cls: type[torch.optim.Optimizer]) -> None:
    """Closure loss is returned, grad-less params are skipped, sparse grads raise."""
    a, b = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = opt_cls([a, b], lr=LR)
    loss = opt.step(lambda: (a * a).sum().backward() or torch.tensor(7.0))
    assert loss.item() == 7.0 and b.grad is None
    assert not torch.equal(a, torch.ones(3)) and torch.equal(b, torch.ones(3))
    a.grad = torch.eye(3)[0].to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
