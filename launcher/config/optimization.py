"""The learning-rate and batch policy groups: optim (with the large-batch swap), schedule, ramp.
No torch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from launcher.config.checks import (
    require,
)
from launcher.config.optimizers import OPTIMIZER_FACTS

# -------------------------------------------------------------------------------- optimisation


@dataclass(frozen=True, kw_only=True)
class LargeBatchConfig:
    enabled: bool = True
    """swap SGD -> LARS and Adam -> LAMB when the global batch exceeds the threshold"""
    threshold: int = 8192
    """largest global batch that keeps the plain optimizer"""
    optimizer: Literal["auto", "lars", "lamb"] = "auto"
    """what to swap in; auto = LARS for SGD, LAMB for Adam/AdamW"""
    base_lr: float | Literal["same"] = "same"
    """the swapped optimizer's LR at optim.ref_batch (then scaled); same = optim.base_lr"""
    weight_decay: float | Literal["same"] = "same"
    """the swapped optimizer's weight decay; same = optim.weight_decay"""
    warmup_epochs: float = 5.0
    """warmup length once swapped (LARS/LAMB papers use longer warmups at 16k+)"""

    def __post_init__(self) -> None:
        require(self.threshold > 0, "optim.large_batch.threshold", self.threshold, "must be > 0")
        require(
            self.base_lr == "same" or self.base_lr > 0,
            "optim.large_batch.base_lr",
            self.base_lr,
            "must be > 0 or same",
        )
        require(
            self.weight_decay == "same" or self.weight_decay >= 0,
            "optim.large_batch.weight_decay",
            self.weight_decay,
            "must be >= 0 or same",
        )
        require(
            self.warmup_epochs >= 0,
            "optim.large_batch.warmup_epochs",
            self.warmup_epochs,
            "must be >= 0",
        )


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    name: Literal["sgd", "lars", "adam", "adamw", "lamb"]  # OPTIMIZER_NAMES (tests hold it)
    """optimizer, from the OPTIMIZERS registry"""
    base_lr: float
    """learning rate at the reference batch"""
    ref_batch: int
    """global batch at which base_lr was tuned"""
    scaling: Literal["auto", "linear", "sqrt", "none"] = "auto"
    """LR scaling rule; auto = linear for the SGD family, sqrt for the Adam family"""
    weight_decay: float = 0.0
    """decoupled for adamw/lamb, L2 otherwise; never applied to norm and bias parameters"""
    momentum: float = 0.9
    """SGD/LARS momentum"""
    nesterov: bool = False
    """Nesterov momentum (SGD/LARS)"""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam-family moment decays"""
    eps: float = 1e-8
    """Adam-family epsilon (LAMB uses 1e-6 when swapped in)"""
    trust_coefficient: float = 0.001
    """LARS eta"""
    clip_grad_norm: float = 0.0
    """clip the global gradient norm to this before each step; 0 = no clipping"""
    large_batch: LargeBatchConfig = dataclasses.field(default_factory=LargeBatchConfig)
    """the large-batch optimizer swap"""

    def __post_init__(self) -> None:
        require(self.base_lr > 0, "optim.base_lr", self.base_lr, "must be > 0")
        require(self.ref_batch > 0, "optim.ref_batch", self.ref_batch, "must be a positive integer")
        require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        require(0 <= self.momentum < 1, "optim.momentum", self.momentum, "must be in [0, 1)")
        require(
            not self.nesterov or self.momentum > 0,
            "optim.nesterov",
            self.nesterov,
            "needs optim.momentum > 0",
        )
        require(
            all(0 <= b < 1 for b in self.betas), "optim.betas", list(self.betas), "each in [0, 1)"
        )
        require(self.eps > 0, "optim.eps", self.eps, "must be > 0")
        require(
            self.trust_coefficient > 0,
            "optim.trust_coefficient",
            self.trust_coefficient,
            "must be > 0",
        )
        require(
            self.clip_grad_norm >= 0, "optim.clip_grad_norm", self.clip_grad_norm, "must be >= 0"
        )

    @property
    def family(self) -> str:
        """Its row of the family table (config/optimizers.py FAMILIES)."""
        return OPTIMIZER_FACTS[self.name].family

    @property
    def lamb_eps(self) -> float:
        """LAMB's epsilon: optim.eps, or the LAMB paper's 1e-6 when LAMB is swapped in for Adam"""
        return self.eps if self.name == "lamb" else 1e-6


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    decay: Literal["cosine", "step", "poly", "constant"] = "cosine"
    """LR decay after warmup, in samples"""
    warmup_epochs: float = 5.0
    """gradual linear warmup length, used when the scaled LR exceeds the reference LR"""
    warmup_samples: int | None = None
    """the warmup length in samples: replaces warmup_epochs (and optim.large_batch.warmup_epochs
    when the optimizer is swapped); null = in epochs"""
    warmup_tokens: int | None = None
    """warmup_samples in tokens, for sequence data: / data.seq_len sequences, exactly; null = not
    in tokens"""
    warmup_from: Literal["ref", "zero"] = "ref"
    """warmup start: the reference LR (Goyal et al.) or zero"""
    milestones: tuple[float, ...] = (30.0, 60.0, 80.0)
    """epochs at which `step` decay multiplies the LR by gamma"""
    gamma: float = 0.1
    """step decay factor"""
    power: float = 2.0
    """poly decay exponent"""
    end_lr: float = 0.0
    """LR at the end of cosine/poly decay"""

    def __post_init__(self) -> None:
        require(
            self.warmup_epochs >= 0, "schedule.warmup_epochs", self.warmup_epochs, "must be >= 0"
        )
        for key in ("warmup_samples", "warmup_tokens"):
            value = getattr(self, key)
            require(value is None or value >= 0, f"schedule.{key}", value, "must be >= 0 or null")
        require(
            list(self.milestones) == sorted(self.milestones)
            and all(m > 0 for m in self.milestones),
            "schedule.milestones",
            list(self.milestones),
            "must be increasing positive epochs",
        )
        require(0 < self.gamma <= 1, "schedule.gamma", self.gamma, "must be in (0, 1]")
        require(self.power > 0, "schedule.power", self.power, "must be > 0")
        require(self.end_lr >= 0, "schedule.end_lr", self.end_lr, "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class RampConfig:
    start_batch: int | None = None
    """first global batch of a ramp-up that doubles the batch up to global_batch; null = none"""
    start_batch_tokens: int | None = None
    """ramp.start_batch in tokens, for sequence data: / data.seq_len sequences, exactly; null =
    not in tokens"""
    samples: int = 0
    """fixed mode: samples the ramp-up lasts: each doubling gets an equal share, and a stage ends
    at the first step boundary at or after its share"""
    tokens: int = 0
    """fixed mode: ramp.samples in tokens, for sequence data: / data.seq_len sequences, exactly;
    0 = not in tokens"""
    mode: Literal["fixed", "adaptive"] = "fixed"
    """fixed: doublings on the ramp.samples schedule; adaptive: the batch grows when the measured
    gradient noise scale says it pays (launcher/planning/adaptive.py)"""
    noise_factor: float = 1.0
    """adaptive: grow to the largest doubling <= B_simple / noise_factor (McCandlish et al. 2018:
    the most efficient batch is near the noise scale)"""
    min_steps: int = 100
    """adaptive: optimizer steps at a batch before it may grow (the noise-scale estimate needs
    measurements: with one micro-batch on one rank every noise_split_every-th step is one)"""

    def __post_init__(self) -> None:
        require(
            self.start_batch is None or self.start_batch > 0,
            "ramp.start_batch",
            self.start_batch,
            "must be a positive integer or null",
        )
        require(
            self.start_batch_tokens is None or self.start_batch_tokens > 0,
            "ramp.start_batch_tokens",
            self.start_batch_tokens,
            "must be a positive integer or null",
        )
        require(self.samples >= 0, "ramp.samples", self.samples, "must be >= 0")
        require(self.tokens >= 0, "ramp.tokens", self.tokens, "must be >= 0")
        fixed = self.mode == "fixed"
        started = self.start_batch is not None or self.start_batch_tokens is not None
        require(
            not started or not fixed or self.samples > 0 or self.tokens > 0,
            "ramp.samples",
            self.samples,
            "must be > 0 when ramp.start_batch is set (ramp.mode=fixed), or ramp.tokens",
        )
        for key in ("samples", "tokens"):
            require(
                fixed or getattr(self, key) == 0,
                f"ramp.{key}",
                getattr(self, key),
                "applies to ramp.mode=fixed only; the adaptive ramp decides by the noise scale (0)",
            )
        require(
            fixed or started,
            "ramp.mode",
            self.mode,
            "adaptive needs ramp.start_batch (the batch it starts from)",
        )
        require(self.noise_factor > 0, "ramp.noise_factor", self.noise_factor, "must be > 0")
        require(self.min_steps > 0, "ramp.min_steps", self.min_steps, "must be > 0")
