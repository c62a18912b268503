"""What the launcher reads off a model beyond its forward: the logits in its outputs, whether its
labels are shifted (Transformers' causal-LM convention), its blocks, its context length.

A Transformers model returns a `ModelOutput` (a dataclass that is also a dict) whose `logits` the
launcher's own per-token loss takes (launcher/models/loss.py: summed over the global batch,
divided by its counted targets, which is Transformers' loss with `num_items_in_batch`). A causal
language model is given its labels unshifted and predicts token t + 1 at position t; `shift` moves
the labels as Transformers' `ForCausalLMLoss` (transformers/loss/loss_utils.py) does, so target t
is the token after input t and no target crosses into padding.

Transformers is never imported here: the core install does not have it, and a model of
Transformers' has imported it already (`sys.modules` tells).
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Mapping
from typing import Any

import torch

from launcher.data.batches import shift as shift  # the loader shifts (data/batches.py)
from launcher.models.gpt import GPT

# A forward that hands its labels to the model's own loss function (PreTrainedModel.loss_function)
_CALLS_LOSS_FUNCTION = re.compile(r"\bself\.loss_function\(")
# Config fields that state a Transformers model's longest sequence (GPT-2's attribute_map makes
# max_position_embeddings read n_positions; older configs have only n_positions)
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions")


def logits_of(outputs: Any) -> Any:
    """A tensor as it is; the tensor `logits` of a ModelOutput (or any object) or of a dict;
    anything else unchanged (your loss may take it)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    found = getattr(outputs, "logits", None)
    if found is None and isinstance(outputs, Mapping):
        found = outputs.get("logits")
    return found if isinstance(found, torch.Tensor) else outputs


def shifts_labels(model: Any) -> bool:
    """Whether `model` takes its labels unshifted and shifts them in its own loss: a Transformers
    model, not an encoder-decoder, whose forward computes its loss with its `loss_function` and
    that function is ForCausalLMLoss.

    Why not the class name, or AutoModelForCausalLM's registry (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
    in transformers 5.25, 19 of the 188 classes registered there do not shift (BartForCausalLM and
    its kin Marian, MBart, Pegasus, Blenderbot, PLBart, Mvp, BigBirdPegasus, TrOCR, Whisper:
    "the labels are not shifted inside the model"; XLNet, XLM, CpmAnt, ProphetNet, Musicgen: their
    own losses on aligned labels), while the 169 that call `self.loss_function` all do, including
    GPT2LMHeadModel, whose name says nothing. The loss function is resolved as
    PreTrainedModel.loss_function resolves it (without its warning for an unknown loss_type)."""
    if sys.modules.get("transformers") is None:  # no Transformers model can exist
        return False
    from transformers import PreTrainedModel
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    if not isinstance(model, PreTrainedModel):
        return False
    if getattr(model.config, "is_encoder_decoder", False):  # labels are the decoder's targets
        return False
    loss = getattr(model, "_loss_function", None)  # set by `model.loss_function = ...`
    if loss is None:  # else by the class name (loss_type), ForCausalLMLoss where none matches
        loss_type = getattr(model, "loss_type", None)
        loss = LOSS_MAPPING.get(loss_type, ForCausalLMLoss) if loss_type else ForCausalLMLoss
    return loss is ForCausalLMLoss and _forward_calls_loss_function(type(model))


def _forward_calls_loss_function(cls: type[torch.nn.Module]) -> bool:
    try:
        source = inspect.getsource(cls.forward)  # unwraps Transformers' decorators
    except (OSError, TypeError):  # no source to read (a frozen or compiled install)
        return False
    return bool(_CALLS_LOSS_FUNCTION.search(source))


def default_blocks(model: Any) -> tuple[str, ...]:
    """The block classes a model declares in `_no_split_modules` (Transformers' decoder layers:
    what it never splits across devices), those the model has, sorted; () if it declares none."""
    declared = getattr(model, "_no_split_modules", None) or ()
    if not declared or not isinstance(model, torch.nn.Module):
        return ()
    present = {type(m).__name__ for m in model.modules()}
    return tuple(sorted(name for name in declared if name in present))


def drop_cache(model: Any) -> None:
    """Turn off a Transformers model's key/value cache (`config.use_cache`, and its text
    decoder's): training never reads it, it would hold every layer's keys and values of the batch
    as long as the outputs live, and under activation checkpointing the recomputed forward
    appends to it a second time (a shape error in backward). generate() still caches: it reads
    the model's generation_config, which keeps use_cache."""
    config = getattr(model, "config", None)
    configs: list[Any] = [config]
    text = getattr(config, "get_text_config", None)
    if callable(text):
        configs.append(text(decoder=True))  # a composite model's (else config itself again)
    for each in configs:
        if getattr(each, "use_cache", None) is True:
            each.use_cache = False


def context_length(model: Any) -> int | None:
    """The longest sequence the model takes: a Transformers model's max_position_embeddings (or
    n_positions; for a composite model its text decoder's), the built-in GPT's position table;
    None where the model states none."""
    if isinstance(model, GPT):
        return int(model.positions.num_embeddings)
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = getattr(config, "get_text_config", None)
    if callable(text):
        config = text(decoder=True)
    for field in _CONTEXT_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
