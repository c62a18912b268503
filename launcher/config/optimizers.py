"""The optimizer table: what the launcher knows of each optimizer it ships, in one place. PURE.

No torch here. Two tables: FAMILIES, what the optimizers of a family share (the LR rule
optim.scaling=auto picks, the optimizer state the memory check counts, the optim.* keys they
read), and OPTIMIZER_FACTS, one row per optimizer naming its family. Its keys are the one list of
optimizer names: the factories in launcher/optim/, the config schema's optim.name and DeepSpeed's
fused optimizers (launcher/backends/ds_config.py) are held to them by tests/test_optimizers.py.
The planner reads the swap and the decay a swapped-to optimizer uses; the DeepSpeed config the
layer-wise trust ratios and the fused optimizer.
Adding an optimizer: its factory in launcher/optim/__init__.py (and module), one row here, its
name in OptimConfig.name's Literal (config/optimization.py) and conf/optim/<name>.yaml. Adding a
family: one FAMILIES row, every field stated (there is no default LR rule).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

LrRule = Literal["linear", "sqrt"]  # the LR x k or x sqrt(k) at k x optim.ref_batch


@dataclass(frozen=True, kw_only=True)
class Family:
    """What the optimizers of one family share. No field has a default: a family states its LR
    rule, or the table does not load."""

    lr_rule: LrRule  # the LR scaling optim.scaling=auto picks for it
    moments: int  # optimizer state tensors per parameter, whatever the config (Adam's two)
    momentum_buffer: bool  # one state tensor more per parameter when optim.momentum > 0
    reads: tuple[str, ...]  # the optim.* keys its optimizers read besides LR and weight decay

    def __post_init__(self) -> None:
        rules = typing.get_args(LrRule)
        if self.lr_rule not in rules:
            raise ValueError(f"lr_rule={self.lr_rule!r}: must be one of {', '.join(rules)}")

    def state_tensors(self, momentum: float) -> int:
        """Optimizer state tensors per parameter with optim.momentum = `momentum`."""
        return self.moments + int(self.momentum_buffer and momentum > 0)


FAMILIES = {
    "sgd": Family(
        lr_rule="linear", moments=0, momentum_buffer=True, reads=("momentum", "nesterov")
    ),
    "adam": Family(lr_rule="sqrt", moments=2, momentum_buffer=False, reads=("betas", "eps")),
}


@dataclass(frozen=True)
class Optimizer:
    family: str  # its row of FAMILIES
    swap: str | None = None  # the layer-wise optimizer it becomes above the large-batch threshold
    swap_poly_power: float | None = None  # a swapped-to optimizer's decay: poly with this power
    layerwise: bool = False  # a trust ratio per parameter tensor (needs whole tensors)
    deepspeed_fused: str | None = None  # DeepSpeed's fused CUDA optimizer of the same update
    decoupled_decay: bool = False  # weight decay apart from the gradient (AdamW), else L2

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(
                f"family={self.family!r}: not a family of the table; add its row to FAMILIES "
                f"(known: {', '.join(FAMILIES)})"
            )


OPTIMIZER_FACTS = {
    "sgd": Optimizer("sgd", swap="lars"),
    "lars": Optimizer("sgd", swap_poly_power=2.0, layerwise=True),  # You et al. 2017
    "adam": Optimizer("adam", swap="lamb", deepspeed_fused="Adam"),
    "adamw": Optimizer("adam", swap="lamb", deepspeed_fused="AdamW", decoupled_decay=True),
    "lamb": Optimizer(  # You et al. 2019
        "adam", swap_poly_power=1.0, layerwise=True, deepspeed_fused="Lamb", decoupled_decay=True
    ),
}
OPTIMIZER_NAMES = tuple(OPTIMIZER_FACTS)


def family_of(optimizer: str) -> Family:
    """The family row of `optimizer` (a key of OPTIMIZER_FACTS)."""
    return FAMILIES[OPTIMIZER_FACTS[optimizer].family]
