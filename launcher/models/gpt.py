"""A GPT-style decoder (Radford et al. 2019) from PyTorch's own transformer layer.

Token and learned position embeddings, `layers` pre-LayerNorm blocks (nn.TransformerEncoderLayer
with norm_first, GELU, a causal mask: PyTorch's scaled-dot-product attention), a final LayerNorm
and an output layer tied to the token embedding. GPT-2 initialisation: N(0, 0.02) weights, the
residual output projections scaled by 1/sqrt(2 x layers), zero biases. Logits are batch x
sequence x vocabulary; every position predicts the next token.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from launcher.config.components import GPTConfig
from launcher.data import DataSpec
from launcher.errors import ConfigError

BLOCKS = (nn.TransformerEncoderLayer,)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, vocab: int, context: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, cfg.width)
        self.positions = nn.Embedding(context, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)
        blocks = [
            nn.TransformerEncoderLayer(
                cfg.width,
                cfg.heads,
                dim_feedforward=4 * cfg.width,
                dropout=cfg.dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(cfg.layers)
        ]
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, vocab, bias=False)
        self.head.weight = self.tokens.weight  # tied (one parameter)
        self.apply(_init)
        for block in blocks:
            for proj in (block.self_attn.out_proj, block.linear2):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * cfg.layers))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        length = idx.shape[1]
        pos = torch.arange(length, device=idx.device)
        x = self.drop(self.tokens(idx) + self.positions(pos))
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=idx.device)
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        logits: torch.Tensor = self.head(self.norm(x))
        return logits


def _init(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)
    if isinstance(m, nn.MultiheadAttention):
        nn.init.normal_(m.in_proj_weight, std=0.02)
        nn.init.zeros_(m.in_proj_bias)


def build(cfg: GPTConfig, spec: DataSpec) -> nn.Module:
    if not spec.tokens or len(spec.input_shape) != 1:
        raise ConfigError(
            f"model.name='gpt': needs token sequences (data=text), the data gives inputs of "
            f"shape {spec.input_shape}"
        )
    assert spec.num_classes is not None  # build_model refuses data that declares none
    return GPT(cfg, vocab=spec.num_classes, context=spec.input_shape[0])
