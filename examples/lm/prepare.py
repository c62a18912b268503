"""Prepare the example's data: a text corpus written from this Python's own standard library, and a
byte-level BPE tokenizer trained on its training files.

    python prepare.py data           # data/train/*.txt, data/eval/*.txt, data/tokenizer.json
    python prepare.py data --vocab 2048 --seed 1

The corpus is the docstrings of the standard library's modules, classes and functions (English
prose with code examples; the test suites and IDLE are left out), one document per docstring, at
least --min-chars long. The documents are shuffled (seeded) and written as shards of plain text,
one paragraph per document (blank lines inside a docstring are dropped: a blank line ends a
document, as `datasets`' text loader reads it with sample_by="paragraph"). Every --eval-every-th
shard is held out for evaluation.

The tokenizer is trained here, once, not by the data factory: every process of a run loads the
same tokenizer.json instead of racing to train (and write) its own. Everything is written to a
temporary folder first and moved into place at the end, so an interrupted prepare leaves no
half-written corpus behind. Nothing is downloaded: it needs only `tokenizers` (the hf extra).
"""

from __future__ import annotations

import argparse
import ast
import random
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

SKIPPED = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}
EOS = "<|endoftext|>"  # appended to every document by the data factory (pydocs/data.py)


def docstrings(min_chars: int) -> Iterator[str]:
    """The standard library's docstrings of at least `min_chars`, in a fixed order (files sorted,
    then the order `ast.walk` visits them), each as one paragraph."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(lib.rglob("*.py")):
        if SKIPPED & set(path.relative_to(lib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):  # templates, other encodings
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node) or ""
                lines = [line.rstrip() for line in text.splitlines() if line.strip()]
                if sum(map(len, lines)) >= min_chars:
                    yield "\n".join(lines)


def write_corpus(folder: Path, docs: list[str], shards: int, eval_every: int) -> tuple[int, int]:
    """The documents as `shards` files (train/ and, every eval_every-th shard, eval/); returns the
    bytes written to each split."""
    sizes = {"train": 0, "eval": 0}
    for split in sizes:
        (folder / split).mkdir(parents=True)
    for shard in range(shards):
        split = "eval" if shard % eval_every == eval_every - 1 else "train"
        text = "\n\n".join(docs[shard::shards]) + "\n"
        (folder / split / f"shard{shard:03d}.txt").write_text(text, encoding="utf-8")
        sizes[split] += len(text.encode())
    return sizes["train"], sizes["eval"]


def train_tokenizer(files: list[Path], vocab: int, out: Path) -> int:
    """A byte-level BPE (GPT-2's pre-tokenizer) trained on `files`, saved as `out`; its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte has a token
        show_progress=False,
    )
    tokenizer.train([str(f) for f in files], trainer)
    tokenizer.save(str(out))
    return tokenizer.get_vocab_size()


def count_tokens(tokenizer_file: Path, folder: Path) -> int:
    """The tokens of the documents in `folder`'s files as the data factory streams them (one
    end-of-text token after each): the most a run's one pass of the stream can hold."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    total = 0
    for path in sorted(folder.glob("*.txt")):
        docs = [d for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
        total += sum(len(e.ids) + 1 for e in tokenizer.encode_batch(docs))
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="where to write (must not exist yet)")
    parser.add_argument("--vocab", type=int, default=1024, help="tokenizer vocabulary size")
    parser.add_argument("--shards", type=int, default=20, help="files the corpus is cut into")
    parser.add_argument("--eval-every", type=int, default=10, help="every Nth shard is eval")
    parser.add_argument("--min-chars", type=int, default=80, help="shorter docstrings are left out")
    parser.add_argument("--seed", type=int, default=0, help="the documents' shuffle")
    args = parser.parse_args(argv)
    if args.folder.exists():
        print(
            f"prepare.py: error: {args.folder} exists; remove it or name another", file=sys.stderr
        )
        return 2
    if not 2 <= args.eval_every <= args.shards or not 257 <= args.vocab <= 65536:
        print(
            "prepare.py: error: need 2 <= --eval-every <= --shards and 257 <= --vocab <= 65536",
            file=sys.stderr,
        )
        return 2
    docs = list(docstrings(args.min_chars))
    random.Random(args.seed).shuffle(docs)
    args.folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.folder.parent, prefix=".prepare-") as tmp:
        work = Path(tmp) / "data"
        train, held = write_corpus(work, docs, args.shards, args.eval_every)
        vocab = train_tokenizer(sorted((work / "train").glob("*.txt")), args.vocab, work / "t.json")
        (work / "t.json").rename(work / "tokenizer.json")
        tokens = [count_tokens(work / "tokenizer.json", work / s) for s in ("train", "eval")]
        shutil.move(str(work), str(args.folder))
    print(
        f"wrote {len(docs)} documents under {args.folder}: train {train:,} bytes = "
        f"{tokens[0]:,} tokens, eval {held:,} bytes = {tokens[1]:,} tokens (a tokenizer of "
        f"{vocab})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
