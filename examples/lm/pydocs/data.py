"""The data factory: the corpus's text files read by Hugging Face `datasets` as a stream,
tokenized on the fly with the byte-level BPE tokenizer prepare.py trained.

Each split is `load_dataset("text", data_files=..., sample_by="paragraph", streaming=True)`: a
`datasets.IterableDataset` of {"text": one document}, read file by file, never loaded whole. Its
`.map` tokenizes batches of documents as they stream past and leaves {"input_ids": [...]}: the
documents of every length that the launcher packs into data.pack_length-token sequences (no target
crossing from one document into the next). The stream has no len(): the run's length is
trainer.tokens (conf/recipe/pydocs.yaml), one pass over at most the stream's tokens.

Every process of a run (and every DataLoader worker) reads the same stream in the same order, and
the launcher gives each its share of every global batch, so there is no sharding to do here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

EOS = "<|endoftext|>"  # prepare.py's special token, appended to every document


def _files(folder: Path, split: str, prepare: str) -> list[str]:
    files = sorted(str(p) for p in (folder / split).glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no {split}/*.txt in {folder.resolve()}; {prepare}")
    return files


def make_stream(root: str = "data", shuffle_buffer: int = 0, seed: int = 0) -> dict[str, Any]:
    """{"train": stream, "eval": stream} of tokenized documents from ROOT/{train,eval}/*.txt with
    ROOT/tokenizer.json. shuffle_buffer > 0: the training stream is shuffled (its files, and
    documents through a buffer of that many, seeded: the same order in every process); prepare.py
    shuffled the documents already, and a buffer's contents are not saved in a checkpoint, so a
    resumed run then re-reads the stream up to its place."""
    from datasets import load_dataset
    from tokenizers import Tokenizer

    folder = Path(root).expanduser()
    prepare = f"write them first: python prepare.py {root}"
    files = {split: _files(folder, split, prepare) for split in ("train", "eval")}
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {folder.resolve()}; {prepare}")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    eos = tokenizer.token_to_id(EOS)

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        encoded = tokenizer.encode_batch(batch["text"])
        return {"input_ids": [e.ids + [eos] for e in encoded]}

    streams = load_dataset("text", data_files=files, sample_by="paragraph", streaming=True)
    train, evaluation = (
        streams[split].map(tokenize, batched=True, remove_columns=["text"])
        for split in ("train", "eval")
    )
    if shuffle_buffer:
        train = train.shuffle(seed=seed, buffer_size=shuffle_buffer)
    return {"train": train, "eval": evaluation}
