"""Gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, "An Empirical Model
of Large-Batch Training", appendix A.1), from gradient norms a data-parallel loop already has.

The squared norm of a mean gradient over B samples has expectation E|G_B|^2 = |G|^2 + tr(Sigma)/B.
Two batch sizes (the micro-batch on one rank, b; the accumulated global batch, B) give unbiased
estimates of both terms (`two_batch`). Each is noisy, so `NoiseScale` keeps bias-corrected
exponential moving averages of the two separately and reports their ratio; while the |G|^2 average
is not positive there is no estimate (None), and a negative tr(Sigma) average counts as 0.

PURE: floats in, floats out; launcher/batchsize/meter.py measures the norms in the loop.
"""

from __future__ import annotations

from dataclasses import dataclass


def two_batch(small_sq: float, small: float, big_sq: float, big: float) -> tuple[float, float]:
    """Unbiased (|G|^2, tr(Sigma)) from |G_small|^2 over `small` samples and |G_big|^2 over `big`
    samples (`small_sq` may be a mean over several small batches: still unbiased)."""
    if not 0 < small < big:
        raise ValueError(f"two_batch: need 0 < small < big, got small={small}, big={big}")
    gradient_sq = (big * big_sq - small * small_sq) / (big - small)
    trace = (small_sq - big_sq) / (1 / small - 1 / big)
    return gradient_sq, trace


@dataclass
class NoiseScale:
    """Bias-corrected EMAs of the two estimates (decay `beta` per update) and their ratio."""

    beta: float = 0.99
    _gradient_sq: float = 0.0
    _trace: float = 0.0
    _weight: float = 0.0  # 1 - beta^n: the EMAs' bias correction, as Adam's

    def __post_init__(self) -> None:
        if not 0 <= self.beta < 1:
            raise ValueError(f"NoiseScale.beta={self.beta}: must be in [0, 1)")

    def update(
        self, small_sq: float, small: float, big_sq: float, big: float, beta: float | None = None
    ) -> None:
        """Fold in one step's norms; `beta` overrides the decay for this update (the loop decays
        per sample: exp(-big / window), so a step's weight grows with its batch)."""
        gradient_sq, trace = two_batch(small_sq, small, big_sq, big)
        b = self.beta if beta is None else beta
        self._gradient_sq = b * self._gradient_sq + (1 - b) * gradient_sq
        self._trace = b * self._trace + (1 - b) * trace
        self._weight = b * self._weight + (1 - b)

    def state_dict(self) -> dict[str, float]:
        return {"gradient_sq": self._gradient_sq, "trace": self._trace, "weight": self._weight}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self._gradient_sq, self._trace = state["gradient_sq"], state["trace"]
        self._weight = state["weight"]

    @property
    def gradient_sq(self) -> float | None:
        return self._gradient_sq / self._weight if self._weight else None

    @property
    def trace(self) -> float | None:
        return max(self._trace, 0.0) / self._weight if self._weight else None

    @property
    def value(self) -> float | None:
        """B_simple, or None before the |G|^2 average is positive."""
        g, s = self.gradient_sq, self.trace
        return None if g is None or g <= 0 or s is None else s / g
