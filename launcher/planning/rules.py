"""The large-batch policy, one rule per plan row: LR scaling (linear, square root), the
LARS/LAMB swap, weight decay, clipping advice, OOM recovery and checkpointing. PURE."""

from __future__ import annotations

import math

from launcher.config.capabilities import capabilities
from launcher.config.execution import BackendConfig, CheckpointConfig, TrainerConfig
from launcher.config.optimization import OptimConfig
from launcher.config.optimizers import OPTIMIZER_FACTS, family_of
from launcher.errors import ConfigError


def fmt(x: float) -> str:
    return f"{x:.6g}"


def base_lr_for(optim: OptimConfig, optimizer: str) -> tuple[float, str]:
    """(LR at ref_batch, its config key) for `optimizer`, which may be a large-batch swap."""
    if optimizer != optim.name and optim.large_batch.base_lr != "same":
        return optim.large_batch.base_lr, "optim.large_batch.base_lr"
    return optim.base_lr, "optim.base_lr"


def scale_lr(
    optim: OptimConfig, global_batch: int, optimizer: str | None = None
) -> tuple[float, str, str]:
    """(lr, rule, reason) for `optimizer` (default optim.name) at `global_batch`.

    The base LR is the recipe's at ref_batch, or optim.large_batch.base_lr for a swapped-in
    optimizer; auto scaling is the rule of the optimizer's family (config/optimizers.py: linear
    for the SGD family, square-root for the Adam family).
    """
    optimizer = optimizer or optim.name
    base, base_key = base_lr_for(optim, optimizer)
    rule = optim.scaling
    if rule == "auto":
        rule = family_of(optimizer).lr_rule
    k = global_batch / optim.ref_batch
    ratio = f"{global_batch}/{optim.ref_batch}"
    if rule == "linear":
        lr, why = base * k, f"{fmt(base)} x {ratio}, linear rule (Goyal et al. 2017)"
    elif rule == "sqrt":
        lr, why = base * math.sqrt(k), f"{fmt(base)} x sqrt({ratio}), square-root rule"
    else:
        lr, why = base, f"{fmt(base)}, not scaled (optim.scaling=none)"
    if optim.scaling == "auto":
        why += f"; auto picks {rule} for {optimizer}"
    if base_key != "optim.base_lr":
        why += f"; base from {base_key}"
    return lr, rule, f"{fmt(lr)} = {why}"


def choose_optimizer(optim: OptimConfig, global_batch: int) -> tuple[str, bool, str]:
    """(optimizer, swapped, reason): SGD -> LARS and Adam -> LAMB above the threshold."""
    big = optim.large_batch
    swap = OPTIMIZER_FACTS[optim.name].swap
    if swap is None:
        return optim.name, False, f"{optim.name} (optim.name)"
    if not big.enabled:
        return optim.name, False, f"{optim.name} (optim.large_batch.enabled=false)"
    if global_batch <= big.threshold:
        return (
            optim.name,
            False,
            (f"{optim.name}: global batch {global_batch} <= large-batch threshold {big.threshold}"),
        )
    target = swap if big.optimizer == "auto" else big.optimizer
    paper = "You et al. 2017" if target == "lars" else "You et al. 2019"
    return (
        target,
        True,
        (
            f"{target} instead of {optim.name}: global batch {global_batch} > "
            f"optim.large_batch.threshold {big.threshold} ({paper})"
        ),
    )


def weight_decay(optim: OptimConfig, swapped: bool) -> tuple[float, str]:
    """(weight decay, reason); never applied to norm and bias parameters."""
    if swapped and optim.large_batch.weight_decay != "same":
        return optim.large_batch.weight_decay, "optim.large_batch.weight_decay"
    return optim.weight_decay, "optim.weight_decay"


CLIP_ADVISED_AT = 8  # batch / ref_batch from which an unclipped plan says what was measured


def clipping(clip: float, scale: float) -> str:
    """The reason of the clip_grad_norm row; off at a batch CLIP_ADVISED_AT x the reference or
    more, it says what unclipped training did at 16x on MNIST-1D."""
    if clip:
        return f"the global gradient norm is clipped to {fmt(clip)} before each step"
    why = "off (optim.clip_grad_norm=0)"
    if scale >= CLIP_ADVISED_AT:
        why += (
            f"; the batch is {fmt(scale)}x optim.ref_batch: on MNIST-1D at 16x with the linear "
            "rule 3 of 8 seeds failed unclipped, none with optim.clip_grad_norm=1.0 "
            "(bench/README.md); consider it"
        )
    return why


def oom_recovery(trainer: TrainerConfig, b: BackendConfig) -> tuple[bool, str]:
    """(on, reason): whether an out-of-memory step can be dropped on every rank and rerun."""
    wanted = trainer.oom_recovery
    if wanted is False:
        return False, "trainer.oom_recovery=false: an out-of-memory error ends the run"
    why = capabilities(b).oom_recovery
    if why is not None:
        if wanted is True:
            raise ConfigError(
                "trainer.oom_recovery=true: not possible with backend.zero_stage="
                f"{getattr(b, 'zero_stage', None)}: "
                f"{why}; use zero_stage 0 or 1, or trainer.oom_recovery=auto|false"
            )
        return False, f"auto: {why}; an out-of-memory error ends the run"
    return True, (
        "an out-of-memory error on any rank drops the step everywhere, halves the micro-batch "
        "and doubles the accumulation (global batch, LR and schedule unchanged)"
    )


def checkpointing(c: CheckpointConfig, backend: BackendConfig) -> tuple[bool, str]:
    """(on, reason): whether checkpoints are written (and can be resumed) with this backend."""
    why = capabilities(backend).checkpoints
    if why is not None:
        return False, why
    when = [f"every {c.every_samples:,} samples"] if c.every_samples else []
    if c.every_tokens:  # converted into every_samples (launcher/planning/tokens.py)
        when = [f"every {c.every_samples:,} samples = {c.every_tokens:,} tokens"]
    when += [f"every {c.every_minutes:g} min"] if c.every_minutes else []
    return True, (
        f"{' and '.join(when + ['at the end'])}, the newest {c.keep} kept in "
        "run_dir/checkpoints (atomic, digest-checked)"
    )
