"""Measures, in the training loop, the squared gradient norms the noise-scale estimate needs.

The plan's `noise` mode (plan.noise_mode) says which two batch sizes are compared:
- micro (every step): after the first micro-step's backward (no all-reduce yet, accumulation not
  gone on) each rank holds the gradient of one micro-batch;
- rank (every step): each rank's whole gradient before the all-reduce;
- split (every `split_every`-th step): the loop runs that step's one micro-batch as two halves
  and the first half's gradient is the small batch. Two consecutive steps' gradients (AdaptDL's
  fallback) were tried first and read a negative |G|^2 while the weights move fast (MNIST-1D at
  lr 0.48); splitting every step cost 18% of the step time on the CPU default run.
against the global gradient after the all-reduce (before clipping). The loss of a piece of n
samples is divided by the per-device batch P, so its mean-gradient norm is (P/n) x larger. A
loss per token (sequences, launcher/models/loss.py) is divided by the global batch's counted
tokens / the world size instead; for it the loop gives as n the piece's counted tokens in samples
of the global batch's mean counted length, for which the same (P/n) holds and which is the
piece's samples when no target is ignored: the estimate stays one in samples. Those sizes may
then differ between ranks: the mean over ranks of |g_small|^2 is then |G|^2 + tr(Sigma) x the mean
of 1/n, so the small batch is the harmonic mean of the ranks' n (their common n otherwise); a
piece without a counted token has no mean gradient, and its step is left out on every rank.

Nothing here waits for the device: norms stay tensors until `flush`, which the loop calls at its
log steps (when it reads the loss anyway) and before a checkpoint, on every rank at once (it sums
the ranks' values). The moving averages decay by the samples since their last update, so the
window (in samples of the run) does not depend on how often a step is measured. Steps with a
non-finite norm (fp16 overflow, the step GradScaler skips) are left out and counted.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from launcher.batchsize.noise import NoiseScale
from launcher.types.plan import BatchPlan
from launcher.types.state import NoiseState


def squared_norm(model: Any) -> torch.Tensor:
    """|grad|^2 over the model's parameters, float64, on the device (no host sync)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        raise RuntimeError("noise scale: no parameter has a gradient after backward")
    return torch.stack(torch._foreach_norm(grads)).double().square().sum()


class NoiseMeter:
    def __init__(self, backend: Any, window: float, split_every: int = 1) -> None:
        """`window`: the averages' time constant in samples (trainer.noise_window x the run's);
        `split_every`: how often a step is split in split mode (trainer.noise_split_every)."""
        self.backend = backend
        self.window = window
        self.split_every = split_every
        self.scale = NoiseScale()
        self.skipped = 0
        self._last_samples: int | None = None  # samples at the last update of the averages
        self._pending: list[tuple[torch.Tensor, float, torch.Tensor, int, int]] = []
        self._small: tuple[torch.Tensor, float] | None = None
        self._samples = 0
        self._split = False

    def start_step(self, step: int, plan: BatchPlan) -> bool:
        """A step starts; returns whether the loop must split its micro-batch in two halves."""
        self._small = None
        self._samples = plan.samples_at(step + 1)
        self._split = plan.noise == "split" and step % self.split_every == 0
        return self._split

    def backward_done(self, model: Any, plan: BatchPlan, j: int, piece: int, n: float) -> None:
        """After the backward of piece `piece` (n samples) of micro-batch j, before any
        all-reduce of this step: keep the local norm the mode compares (rank mode: one
        micro-batch per step, the rank's whole per-device batch, is the piece)."""
        mode, last = plan.noise, plan.accumulation - 1
        first = j == 0 and piece == 0 and (mode == "micro" or (mode == "split" and self._split))
        if first or (mode == "rank" and j == last):
            if not n:  # no counted token (a loss per token): NaN leaves the step out (flush)
                self._small = (squared_norm(model) * math.nan, n)
                return
            factor = (plan.per_device_batch / n) ** 2
            self._small = (squared_norm(model) * factor, n)

    def reduced(self, model: Any, plan: BatchPlan, norms: torch.Tensor | None = None) -> None:
        """After the all-reduce, before clipping and the optimizer step. `norms`: the
        gradients' per-tensor norms where the loop has them (guard.py grad_norms: the same
        values squared_norm would compute from)."""
        if self._small is None:  # split mode, a step that was not split
            return
        scale2 = self.backend.gradient_scale() ** 2  # fp16: the gradients are still scaled
        small_sq, small = self._small
        big = squared_norm(model) if norms is None else norms.double().square().sum()
        big_sq = big / scale2
        self._pending.append((small_sq / scale2, small, big_sq, plan.global_batch, self._samples))
        self._small = None

    def dropped(self) -> None:
        """The step was dropped (out of memory): forget its local norm."""
        self._small = None

    def flush(self) -> dict[str, float]:
        """Fold the pending steps into the estimate (collective: every rank calls it at the same
        steps); returns the current estimates for the metrics."""
        if self._pending:
            values = torch.stack(
                [
                    torch.stack([s, b, s.new_tensor(1 / n if n else 0.0)])
                    for s, n, b, _, _ in self._pending
                ]
            )
            values = self.backend.sum(values) / self.backend.world_size
            for (small_sq, big_sq, mean_inverse), (_, n, _, big, samples) in zip(
                values.tolist(), self._pending, strict=True
            ):
                gap = big if self._last_samples is None else samples - self._last_samples
                self._last_samples = samples
                small = _small_batch(n, mean_inverse)
                if math.isfinite(small_sq) and math.isfinite(big_sq) and math.isfinite(small):
                    beta = math.exp(-gap / self.window)
                    self.scale.update(small_sq, small, big_sq, big, beta)
                else:
                    self.skipped += 1
            self._pending.clear()
        out = {"grad_sq": self.scale.gradient_sq, "grad_trace": self.scale.trace}
        out["noise_scale"] = self.scale.value
        return {k: v for k, v in out.items() if v is not None}

    def state_dict(self) -> NoiseState:
        """The estimate's running state (for checkpoints; call after `flush`)."""
        return {"ema": self.scale.state_dict(), "skipped": self.skipped, "at": self._last_samples}

    def load_state_dict(self, state: NoiseState) -> None:
        self.scale.load_state_dict(state["ema"])
        self.skipped, self._last_samples = state["skipped"], state["at"]


def _small_batch(n: float, mean_inverse: float) -> float:
    """The small batch of a step: this rank's size `n` where every rank's is the same (the mean
    of 1/n over the ranks is 1/n), else the harmonic mean of the ranks' sizes."""
    if n and math.isclose(1 / n, mean_inverse, rel_tol=1e-12):
        return n
    return 1 / mean_inverse if mean_inverse > 0 else math.nan
