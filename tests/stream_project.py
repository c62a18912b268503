"""A user's project whose data is a stream of variable-length token sequences in dict batches
(Hugging Face's form: input_ids, labels) with its own padding collate, and whose model takes
`input_ids` as a keyword. The collate writes the sample ids it batches in DataLoader workers to
STREAMPROJ_SEEN/<pid>.txt when that is set, so a test can count every sample a run trained on."""

from __future__ import annotations

from pathlib import Path

from tests import user_project

PACKAGE = "streamproj"

PARTS = '''
"""Streamed token sequences (the target at each position: the next id mod the vocabulary)."""

import os

import torch
from torch import nn
from torch.utils.data import IterableDataset, get_worker_info


class Docs(IterableDataset):
    def __init__(self, n, vocab, seed, sized, first=0):
        self.n, self.vocab, self.seed, self.sized, self.first = n, vocab, seed, sized, first

    def __len__(self):
        if not self.sized:
            raise TypeError("a stream without len()")
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        for i in range(self.n):
            ids = torch.randint(self.vocab, (1 + (7 * i) % 12,), generator=g)
            yield {"idx": self.first + i, "input_ids": ids, "labels": (ids + 1) % self.vocab}


def pad(samples):
    seen = os.environ.get("STREAMPROJ_SEEN")
    if seen and get_worker_info() is not None:
        with open(os.path.join(seen, f"{os.getpid()}.txt"), "a") as f:
            f.write("".join(f"{s['idx']}\\n" for s in samples))
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    labels = torch.full((len(samples), width), -100)
    for i, s in enumerate(samples):
        ids[i, : len(s["input_ids"])] = s["input_ids"]
        labels[i, : len(s["labels"])] = s["labels"]
    return {"input_ids": ids, "labels": labels}


def make_stream(n=192, vocab=11, sized=True, by_rank=False):
    """by_rank: a mistake, each rank's stream seeded by its rank (the ranks see other data)."""
    seed = 1 + (int(os.environ.get("RANK", "0")) if by_rank else 0)
    return {
        "train": Docs(n, vocab, seed=seed, sized=sized),
        "eval": Docs(40, vocab, seed=2, sized=sized, first=10_000),
        "collate_fn": pad,
        "num_classes": vocab,
    }


class DocStream(IterableDataset):
    """Documents only (token ids of every length), to be packed by data.pack_length."""

    def __init__(self, docs):
        self.docs = docs

    def __iter__(self):
        yield from self.docs


def make_documents(n=300, vocab=11, form="list", bad_at=-1):
    """Documents counting up mod vocab from a random start (learnable: next = this + 1), of
    lengths 1..20; `form` list (map-style) or stream; `bad_at`: that document is 2-D (a mistake)."""
    g = torch.Generator().manual_seed(5)
    docs = []
    for i in range(n):
        start = int(torch.randint(vocab, (1,), generator=g))
        ids = (start + torch.arange(1 + (5 * i) % 20)) % vocab
        docs.append(ids.reshape(1, -1) if i == bad_at else ids)
    train, test = docs[: n * 4 // 5], docs[n * 4 // 5 :]
    if form == "stream":
        train, test = DocStream(train), DocStream(test)
    return {"train": train, "eval": test, "num_classes": vocab}


class Sequences(torch.utils.data.Dataset):
    """Map-style sequences of long-tailed lengths (token budgets), as dicts like Docs'."""

    def __init__(self, n, vocab, seed):
        g = torch.Generator().manual_seed(seed)
        lengths = (torch.empty(n).log_normal_(2.0, 0.8, generator=g).clamp(2, 60)).long()
        self.items = []
        for i, length in enumerate(lengths.tolist()):
            ids = torch.randint(vocab, (length,), generator=g)
            self.items.append({"idx": i, "input_ids": ids, "labels": (ids + 1) % vocab})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def make_sequences(n=256, vocab=11):
    return {
        "train": Sequences(n, vocab, 1),
        "eval": Sequences(48, vocab, 2),
        "collate_fn": pad,
        "num_classes": vocab,
    }


def extra_key(samples):
    """A mistake: a key the model's forward does not take."""
    return pad(samples) | {"extra": torch.zeros(len(samples))}


def no_labels(samples):
    """A mistake: no labels in the batch."""
    return {"input_ids": pad(samples)["input_ids"]}


def make_collated(collate="extra_key"):
    """The stream with one of the mistaken collates above."""
    return make_stream(64) | {"collate_fn": globals()[collate]}


class Tagger(nn.Module):
    def __init__(self, vocab=11, width=16):
        super().__init__()
        self.emb, self.out = nn.Embedding(vocab, width), nn.Linear(width, vocab)

    def forward(self, input_ids):
        return self.out(torch.tanh(self.emb(input_ids)))
'''

FILES = {
    f"{PACKAGE}/__init__.py": '"""streamproj: a user\'s project with streamed data."""\n',
    f"{PACKAGE}/parts.py": PARTS,
    "conf/recipe/streamed.yaml": """
        defaults:
          - override /model: tagger
          - override /data: stream
          - override /optim: adamw
          - override /schedule: constant
        global_batch: 16
        micro_batch: 2
        optim:
          base_lr: 0.01
          ref_batch: 16
        schedule:
          warmup_epochs: 0
        trainer:
          epochs: 2
          cpu_threads: 1
          progress: false
          tensorboard: false
          log_every: 1
        checkpoint:
          every_samples: 32
    """,
    "conf/model/tagger.yaml": f"_target_: {PACKAGE}.parts.Tagger\nvocab: 11\n",
    "conf/model/llama.yaml": """
        # a Transformers causal LM built offline from a config (pip install 'globalbatch[hf]')
        _target_: transformers.AutoModelForCausalLM.from_config
        config:
          _target_: transformers.LlamaConfig
          vocab_size: 11
          hidden_size: 32
          intermediate_size: 64
          num_hidden_layers: 2
          num_attention_heads: 4
          num_key_value_heads: 2
          max_position_embeddings: 64
    """,
    "conf/data/stream.yaml": f"_target_: {PACKAGE}.parts.make_stream\nworkers: 2\n",
    "conf/data/sequences.yaml": f"_target_: {PACKAGE}.parts.make_sequences\n",
    "conf/data/documents.yaml": f"_target_: {PACKAGE}.parts.make_documents\npack_length: 8\n",
}


def write_project(root: Path) -> Path:
    """Write the project under `root`; returns its config dir (`root`/conf)."""
    return user_project.write_project(root, FILES)
