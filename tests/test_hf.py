"""Hugging Face models (issue 31): the launcher's per-token loss on a Transformers model's logits
is Transformers' own loss with `num_items_in_batch`, what the launcher reads off such a model
(launcher/models/outputs.py), its blocks by default, and how it is built offline through
`_target_`; and a missing extra names itself.

Stated tolerance: float64 models; losses within 1e-12 and gradients within 1e-10 (absolute) of
each other. Transformers' loss upcasts the logits with `.float()` (transformers/loss/loss_utils.py
ForCausalLMLoss), which for a float64 model is float32: it is compared with the launcher's loss on
the same float32 logits to those tolerances, and with the launcher's float64 loss to float32's
rounding (1e-6 relative). Tests that need transformers skip without it (the core install)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from launcher.config.targets import instantiate, locate
from launcher.data import IGNORE_INDEX
from launcher.errors import ConfigError
from launcher.models.loss import CrossEntropy
from launcher.models.outputs import context_length, default_blocks, logits_of, shift, shifts_labels

VOCAB = 100
LLAMA = {  # a tiny Llama: 2 decoder layers of width 32
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
}
GPT2 = {"n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": VOCAB, "n_positions": 48}
GPT2_NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
LENGTHS = (12, 5, 9, 3, 12, 7, 1, 10)  # one global batch of variable-length sequences


def transformers():
    return pytest.importorskip("transformers")


def tiny(kind: str) -> nn.Module:
    """A float64 model of Transformers' from its config, seeded."""
    tf = transformers()
    torch.manual_seed(0)
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**LLAMA)).double()
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(**GPT2, **GPT2_NO_DROPOUT)).double()
    if kind == "bart_causal":  # a decoder that takes its labels already shifted
        config = tf.BartConfig(
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            dropout=0.0,
        )
        return tf.BartForCausalLM(config).double()
    if kind == "llama_classifier":
        return tf.LlamaForSequenceClassification(tf.LlamaConfig(**LLAMA, num_labels=3)).double()
    raise AssertionError(kind)


def padded_batch(lengths: tuple[int, ...] = LENGTHS) -> tuple[torch.Tensor, ...]:
    """input_ids, attention_mask, labels (= input_ids, IGNORE_INDEX at padding): right-padded
    sequences as a padding collate gives them."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (len(lengths), max(lengths)), generator=g)
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask
    return ids, mask, ids.masked_fill(mask == 0, IGNORE_INDEX)


def grads(model: nn.Module) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


def assert_grads_equal(a: list[torch.Tensor], b: list[torch.Tensor], tol: float) -> None:
    assert len(a) == len(b)
    for g, h in zip(a, b, strict=True):
        torch.testing.assert_close(g, h, rtol=0, atol=tol)


# ------------------------------------------------------------------- the launcher's loss
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_launcher_loss_is_transformers_loss_with_num_items_in_batch(kind):
    """One large padded batch: the launcher's token sum of the logits over the shifted labels,
    divided by their count, is the model's own loss given the labels and that count, in value
    and gradient; split into 4 micro-batches (each padded to its own longest), the sum of the
    micro-batches' token sums over the global count is the same loss and gradient
    (accumulation), and each micro-batch's term is Transformers' loss of that micro-batch with
    num_items_in_batch = the global count."""
    model = tiny(kind)
    assert shifts_labels(model)
    ids, mask, labels = padded_batch()
    ce = CrossEntropy()
    count = ce.counted(shift(labels))
    assert count == sum(n - 1 for n in LENGTHS)  # the last token of each predicts nothing

    theirs = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=count)
    theirs.loss.backward()
    grads_theirs = grads(model)
    logits = logits_of(model(input_ids=ids, attention_mask=mask))
    assert logits.dtype == torch.float64 and logits.shape == (*ids.shape, VOCAB)
    same_cast = ce.token_sum(logits.float(), shift(labels)) / count  # Transformers' own cast
    assert abs(same_cast.item() - theirs.loss.item()) <= 1e-12
    same_cast.backward()
    assert_grads_equal(grads(model), grads_theirs, 1e-10)

    whole = ce.token_sum(logits_of(model(input_ids=ids, attention_mask=mask)), shift(labels))
    whole = whole / count
    assert whole.dtype == torch.float64
    torch.testing.assert_close(whole, theirs.loss.double(), rtol=1e-6, atol=0)
    whole.backward()
    grads_whole = grads(model)

    accumulated = torch.zeros((), dtype=torch.float64)
    for rows in torch.arange(len(LENGTHS)).chunk(4):
        width = int(mask[rows].sum(dim=1).max())  # a micro-batch padded to its own longest
        x, m, y = ids[rows, :width], mask[rows, :width], labels[rows, :width]
        logits = logits_of(model(input_ids=x, attention_mask=m))
        term = ce.token_sum(logits, shift(y)) / count
        term.backward()  # gradients accumulate over the micro-batches
        accumulated += term.detach()
        with torch.no_grad():
            own = model(input_ids=x, attention_mask=m, labels=y, num_items_in_batch=count).loss
            cast = ce.token_sum(logits.float(), shift(y)) / count
        assert abs(cast.item() - own.item()) <= 1e-12
    assert abs(accumulated.item() - whole.item()) <= 1e-12
    assert_grads_equal(grads(model), grads_whole, 1e-10)


def test_shift_is_transformers_causal_shift():
    """Target t is label t + 1; the last is IGNORE_INDEX; the shape is kept (any leading dims)."""
    labels = torch.tensor([[5, 6, 7, IGNORE_INDEX], [1, 2, IGNORE_INDEX, IGNORE_INDEX]])
    assert shift(labels).tolist() == [[6, 7, -100, -100], [2, -100, -100, -100]]
    assert shift(torch.tensor([3, 4])).tolist() == [4, -100]
    assert shift(labels).shape == labels.shape and shift(labels).is_contiguous()


def test_shift_gives_transformers_loss_function_its_own_answer():
    """ForCausalLMLoss on (logits, labels) == the mean cross-entropy on (logits, shift(labels))."""
    loss_utils = pytest.importorskip("transformers.loss.loss_utils")
    _, _, labels = padded_batch()
    logits = torch.randn(*labels.shape, VOCAB, generator=torch.Generator().manual_seed(1))
    theirs = loss_utils.ForCausalLMLoss(logits, labels, vocab_size=VOCAB)
    ours = F.cross_entropy(logits.reshape(-1, VOCAB), shift(labels).reshape(-1))
    assert torch.equal(theirs, ours)


# --------------------------------------------------------------- what is read off a model
def test_logits_of_takes_the_logits_and_leaves_anything_else():
    t = torch.zeros(2, 3)
    assert logits_of(t) is t
    assert logits_of(SimpleNamespace(logits=t, loss=None)) is t
    assert logits_of({"logits": t, "past_key_values": None}) is t
    for other in ((t, t), {"scores": t}, SimpleNamespace(logits="not a tensor"), None):
        assert logits_of(other) is other  # your loss may take it


def test_logits_of_a_model_output():
    tf = transformers()
    t = torch.zeros(2, 3)
    assert logits_of(tf.modeling_outputs.CausalLMOutputWithPast(logits=t)) is t
    hidden = tf.modeling_outputs.BaseModelOutput(last_hidden_state=t)
    assert logits_of(hidden) is hidden


@pytest.mark.parametrize(
    ("kind", "shifts"),
    [("llama", True), ("gpt2", True), ("bart_causal", False), ("llama_classifier", False)],
)
def test_shifts_labels_agrees_with_the_models_own_loss(kind, shifts):
    """Llama and GPT-2 (whose class name says nothing) shift their labels; BartForCausalLM,
    registered as a causal LM too, takes them already shifted: each model's own loss is the
    cross-entropy of its logits on the labels shifted exactly where shifts_labels says so."""
    model = tiny(kind)
    assert shifts_labels(model) is shifts
    if kind == "llama_classifier":
        return  # one label per sequence: nothing to shift
    ids, mask, labels = padded_batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    right, wrong = (shift(labels), labels) if shifts else (labels, shift(labels))

    def cross_entropy(targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.logits.reshape(-1, VOCAB), targets.reshape(-1))

    torch.testing.assert_close(out.loss.double(), cross_entropy(right), rtol=1e-6, atol=0)
    assert not torch.allclose(out.loss.double(), cross_entropy(wrong), rtol=1e-6, atol=0)


def test_a_plain_model_without_transformers(monkeypatch):
    """No Transformers installed (its import fails): a plain model is not shifted, declares no
    blocks and no context; the built-in GPT's context is its position table."""
    from launcher.config.components import GPTConfig
    from launcher.models.gpt import GPT

    monkeypatch.setitem(sys.modules, "transformers", None)
    plain = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    assert shifts_labels(plain) is False
    assert default_blocks(plain) == ()
    assert context_length(plain) is None
    gpt = GPT(GPTConfig(name="gpt", layers=1, width=8, heads=2), vocab=10, context=16)
    assert context_length(gpt) == 16 and shifts_labels(gpt) is False


def test_blocks_and_context_of_transformers_models():
    llama, gpt2 = tiny("llama"), tiny("gpt2")
    assert default_blocks(llama) == ("LlamaDecoderLayer",)
    assert default_blocks(gpt2) == ("GPT2Block",)
    assert context_length(llama) == LLAMA["max_position_embeddings"]
    assert context_length(gpt2) == GPT2["n_positions"]


def test_blocks_of_a_transformers_model_are_its_decoder_layers():
    """model._target_ with no checkpoint_blocks: FSDP2's units and activation checkpointing's
    blocks are the model's LlamaDecoderLayers; checkpointing them keeps loss and gradients."""
    transformers()
    from launcher.backends.fsdp import shard_units
    from launcher.config.components import UserModelConfig
    from launcher.data import DataSpec
    from launcher.models import blocks_of, build_model

    kwargs = {"config": {"_target_": "transformers.LlamaConfig", **LLAMA}}
    target = "transformers.AutoModelForCausalLM.from_config"
    spec = DataSpec(input_shape=(12,), num_classes=None)
    ids, mask, labels = padded_batch()
    results = []
    for checkpointing in (False, True):
        cfg = UserModelConfig(target=target, kwargs=kwargs, activation_checkpointing=checkpointing)
        torch.manual_seed(0)
        model = build_model(cfg, spec).double()
        assert model.config.use_cache is False  # a recomputed forward would append to it
        (block,) = blocks_of(cfg, model)
        assert block.__name__ == "LlamaDecoderLayer"
        units = shard_units(model, blocks_of(cfg, model))
        assert len(units) == LLAMA["num_hidden_layers"]
        loss = CrossEntropy().token_sum(
            logits_of(model(input_ids=ids, attention_mask=mask)), shift(labels)
        )
        loss.backward()
        results.append((model, loss.detach(), grads(model)))
    (plain, loss_a, grads_a), (wrapped, loss_b, grads_b) = results
    assert sum("CheckpointWrapper" in type(m).__name__ for m in wrapped.modules()) == 2
    assert abs(loss_a.item() - loss_b.item()) <= 1e-12
    assert_grads_equal(grads_a, grads_b, 1e-10)


# ----------------------------------------------------------------- built through _target_
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network (as in CI): a Hub look-up fails at once instead of retrying for ~25 s.
    huggingface_hub read HF_HUB_OFFLINE when it was imported: its constant is set."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_a_nested_config_target_builds_offline(monkeypatch):
    offline(monkeypatch)
    tf = transformers()
    model = instantiate(
        "transformers.AutoModelForCausalLM.from_config",
        {"config": {"_target_": "transformers.LlamaConfig", **LLAMA}},
        "model",
    )
    assert isinstance(model, tf.LlamaForCausalLM)
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == VOCAB


def test_from_pretrained_loads_a_local_folder(tmp_path, monkeypatch):
    offline(monkeypatch)
    saved = tiny("llama")
    saved.save_pretrained(tmp_path / "tiny-llama")
    target = "transformers.AutoModelForCausalLM.from_pretrained"
    kwargs = {"pretrained_model_name_or_path": str(tmp_path / "tiny-llama")}
    loaded = instantiate(target, kwargs, "model")
    assert type(loaded) is type(saved)
    for (name, a), b in zip(saved.state_dict().items(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a.to(b.dtype), b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("{tmp}/nowhere", "no such folder"),
        ("./nowhere", "no such folder"),
        ("someone/nowhere", "not a local folder, and Transformers could not load it as a Hub"),
    ],
)
def test_from_pretrained_of_no_folder_is_one_line_naming_key_and_path(
    tmp_path, monkeypatch, value, said
):
    transformers()
    offline(monkeypatch)
    monkeypatch.chdir(tmp_path)
    value = value.format(tmp=tmp_path)
    with pytest.raises(ConfigError) as caught:
        instantiate(
            "transformers.AutoModelForCausalLM.from_pretrained",
            {"pretrained_model_name_or_path": value},
            "model",
        )
    message = str(caught.value)
    assert message.startswith(f"model.pretrained_model_name_or_path={value!r}: {said}"), message
    assert "\n" not in message


# ----------------------------------------------------------------- a missing extra names itself
@pytest.mark.parametrize("package", ["transformers", "datasets", "tokenizers", "torchdata"])
def test_a_target_of_a_missing_extra_names_the_extra(monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed
    target = f"{package}.Something.from_config"
    with pytest.raises(ConfigError) as caught:
        locate(target, "model")
    assert str(caught.value) == (
        f"model._target_={target!r}: needs {package}, which is not installed: "
        "pip install 'globalbatch[hf]'"
    )


def test_a_users_module_or_nested_target_needing_a_missing_extra_names_it(tmp_path, monkeypatch):
    """The user's module imports datasets at its top, a factory imports it inside, a nested
    `_target_` names transformers: each is the same one line under the user's key."""
    (tmp_path / "hfuser_top.py").write_text("import datasets\n\ndef make():\n    return 1\n")
    (tmp_path / "hfuser_inside.py").write_text("def make():\n    import datasets\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("datasets", "transformers"):
        monkeypatch.setitem(sys.modules, name, None)
    needs = "which is not installed: pip install 'globalbatch[hf]'"
    cases = [
        ("hfuser_top.make", {}, "datasets"),
        ("hfuser_inside.make", {}, "datasets"),
        ("builtins.dict", {"config": {"_target_": "transformers.LlamaConfig"}}, "transformers"),
    ]
    for target, kwargs, package in cases:
        with pytest.raises(ConfigError) as caught:
            instantiate(target, kwargs, "data")
        assert str(caught.value) == f"data._target_={target!r}: needs {package}, {needs}"
