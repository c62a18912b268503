"""Measures, in the training loop, the squared gradient norms the noise-scale estimate needs.

The plan's `noise` mode (plan.noise_mode) says which two batch sizes are compared each step:
- micro: after the first micro-step's backward (no all-reduce yet, accumulation not gone on) each
  rank's gradient is that of one micro-batch; the loss was divided by the per-device batch, so
  its mean-gradient norm is `accumulation` x larger. Against the global gradient after the
  all-reduce.
- rank: each rank's whole gradient before the all-reduce against the global one after it.
With one micro-batch per step on one rank the plan splits the step in two (plan.noise_measurement):
two consecutive steps' gradients (AdaptDL's fallback) were tried and read negative |G|^2 while the
weights move fast (MNIST-1D at lr 0.48).

Nothing here waits for the device: norms stay tensors until `flush`, which the loop calls at its
log steps (when it reads the loss anyway) and before a checkpoint, on every rank at once (it sums
the ranks' values). Steps with a non-finite norm (fp16 overflow, the step GradScaler skips) are
left out and counted.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from launcher.noise import NoiseScale
from launcher.plan import BatchPlan


def squared_norm(model: Any) -> torch.Tensor:
    """|grad|^2 over the model's parameters, float64, on the device (no host sync)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        raise RuntimeError("noise scale: no parameter has a gradient after backward")
    return torch.nn.utils.get_total_norm(grads).double().square()


class NoiseMeter:
    def __init__(self, backend: Any, beta: float = 0.99) -> None:
        self.backend = backend
        self.scale = NoiseScale(beta)
        self.skipped = 0
        self._pending: list[tuple[torch.Tensor, int, torch.Tensor, int]] = []
        self._small: torch.Tensor | None = None

    def micro_step_done(self, model: Any, plan: BatchPlan, j: int) -> None:
        """After micro-step j's backward, before any all-reduce of this step."""
        if plan.noise == "micro" and j == 0:
            self._small = squared_norm(model) * plan.accumulation**2
        elif plan.noise == "rank" and j == plan.accumulation - 1:
            self._small = squared_norm(model)

    def reduced(self, model: Any, plan: BatchPlan) -> None:
        """After the all-reduce, before clipping and the optimizer step."""
        if self._small is None:
            raise RuntimeError(f"noise scale ({plan.noise}): no local norm this step")
        scale2 = self.backend.gradient_scale() ** 2  # fp16: the gradients are still scaled
        big = squared_norm(model) / scale2
        small = plan.micro_batch if plan.noise == "micro" else plan.per_device_batch
        self._pending.append((self._small / scale2, small, big, plan.global_batch))
        self._small = None

    def dropped(self) -> None:
        """The step was dropped (out of memory): forget its local norm."""
        self._small = None

    def flush(self) -> dict[str, float]:
        """Fold the pending steps into the estimate (collective: every rank calls it at the same
        steps); returns the current estimates for the metrics."""
        if self._pending:
            values = torch.stack([torch.stack([s, b]) for s, _, b, _ in self._pending])
            values = self.backend.sum(values) / self.backend.world_size
            for (small_sq, big_sq), (_, small, _, big) in zip(
                values.tolist(), self._pending, strict=True
            ):
                if math.isfinite(small_sq) and math.isfinite(big_sq):
                    self.scale.update(small_sq, small, big_sq, big)
                else:
                    self.skipped += 1
            self._pending.clear()
        out = {"grad_sq": self.scale.gradient_sq, "grad_trace": self.scale.trace}
        out["noise_scale"] = self.scale.value
        return {k: v for k, v in out.items() if v is not None}

    def state_dict(self) -> dict[str, Any]:
        """The estimate's running state (for checkpoints; call after `flush`)."""
        return {"ema": self.scale.state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale.load_state_dict(state["ema"])
        self.skipped = state["skipped"]
