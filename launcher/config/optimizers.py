"""The optimizer table: what the launcher knows of each optimizer it ships, in one place. PURE.

No torch here: the config checks read it (which optim.* keys apply: the family), the planner
(the large-batch swap and the decay a swapped-to optimizer uses), the DeepSpeed config (layer-wise
trust ratios, DeepSpeed's fused CUDA optimizer) and the factories in launcher/optim/ (the names).
Adding an optimizer: its factory in launcher/optim/__init__.py (and module), one row here, its
name in OptimConfig.name's Literal (config/schema.py) and conf/optim/<name>.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Optimizer:
    family: str  # "sgd" (momentum, nesterov) or "adam" (betas, eps): the optim.* keys it reads
    swap: str | None = None  # the layer-wise optimizer it becomes above the large-batch threshold
    swap_poly_power: float | None = None  # a swapped-to optimizer's decay: poly with this power
    layerwise: bool = False  # a trust ratio per parameter tensor (needs whole tensors)
    deepspeed_fused: str | None = None  # DeepSpeed's fused CUDA optimizer of the same update


OPTIMIZER_FACTS = {
    "sgd": Optimizer("sgd", swap="lars"),
    "lars": Optimizer("sgd", swap_poly_power=2.0, layerwise=True),  # You et al. 2017
    "adam": Optimizer("adam", swap="lamb", deepspeed_fused="Adam"),
    "adamw": Optimizer("adam", swap="lamb", deepspeed_fused="AdamW"),
    "lamb": Optimizer("adam", swap_poly_power=1.0, layerwise=True, deepspeed_fused="Lamb"),  # 2019
}
SGD_FAMILY = tuple(name for name, o in OPTIMIZER_FACTS.items() if o.family == "sgd")
ADAM_FAMILY = tuple(name for name, o in OPTIMIZER_FACTS.items() if o.family == "adam")
