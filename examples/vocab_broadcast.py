"""The main rank builds a vocabulary and an embedding; every rank gets them.

    torchrun --standalone --nproc-per-node 2 examples/vocab_broadcast.py --dir /tmp/sd-vocab
    python examples/vocab_broadcast.py --dir /tmp/sd-vocab   # one process, Null backend

``build_vocab`` is ``@sd.on_main_only(broadcast=True)``: only the main rank
reads the corpus (it writes a small one first, if ``--dir`` has none), counts
the words and initialises an embedding matrix; every rank returns the main
rank's result.  The word lists travel pickled; the embedding, a torch
tensor, travels by ``dist.broadcast``.  The embedding is drawn from
``os.urandom``, so no other rank could have made the same one itself.

Every rank prints a checksum of what it holds and compares it with the main
rank's (a second, small broadcast).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import TypedDict

import torch

import syncdeco as sd

EMBEDDING_DIM = 16
WORD = re.compile(r"[a-z']+")
SPECIALS = ["<pad>", "<unk>"]

CORPUS = """\
Every rank must reach every sync point in the same order.
The main rank builds the vocabulary and the other ranks wait for it.
A rank that raises inside a synced region re-raises its own exception.
The other ranks get PeerFailedError naming the rank that failed.
A broadcast result travels pickled, except its tensors, which go by broadcast.
The main rank saves the checkpoint and every rank waits until it is written.
"""


class Vocab(TypedDict):
    itos: list[str]  # id -> word
    stoi: dict[str, int]  # word -> id
    embedding: torch.Tensor  # one row per word


def say(message: str) -> None:
    # One write per line (newline included), so that lines from different
    # ranks do not interleave, even with PYTHONUNBUFFERED set.
    print(f"[rank {sd.rank()}/{sd.world_size()}] {message}\n", end="", flush=True)


@sd.on_main_only(broadcast=True)
def build_vocab(corpus: Path, min_count: int) -> Vocab:
    """Runs on the main rank only; every rank returns its result."""
    if not corpus.exists():
        corpus.parent.mkdir(parents=True, exist_ok=True)
        corpus.write_text(CORPUS * 3)
    counts = Counter(WORD.findall(corpus.read_text().lower()))
    words = sorted(w for w, n in counts.items() if n >= min_count)
    itos = SPECIALS + words
    seed = int.from_bytes(os.urandom(8), "little")  # only this rank knows it
    gen = torch.Generator().manual_seed(seed)
    embedding = torch.randn(len(itos), EMBEDDING_DIM, generator=gen)
    say(f"built a vocabulary of {len(itos)} words from {sum(counts.values())} in {corpus.name}")
    return {"itos": itos, "stoi": {w: i for i, w in enumerate(itos)}, "embedding": embedding}


def checksum(vocab: Vocab) -> str:
    digest = hashlib.sha256(json.dumps([vocab["itos"], vocab["stoi"]]).encode())
    embedding = vocab["embedding"].detach().cpu().contiguous()
    digest.update(bytes(embedding.view(torch.uint8).flatten().tolist()))
    return digest.hexdigest()[:16]


@sd.on_main_only(broadcast=True)
def main_checksum(vocab: Vocab) -> str:
    return checksum(vocab)


def encode(vocab: Vocab, text: str) -> list[int]:
    unk = vocab["stoi"]["<unk>"]
    return [vocab["stoi"].get(w, unk) for w in WORD.findall(text.lower())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "syncdeco-vocab",
        help="where the corpus is, or is written (default: %(default)s)",
    )
    parser.add_argument("--min-count", type=int, default=2, help="drop rarer words")
    args = parser.parse_args()

    vocab = build_vocab(args.dir / "corpus.txt", args.min_count)
    embedding = vocab["embedding"]
    mine = checksum(vocab)
    say(
        f"vocab of {len(vocab['itos'])} words, embedding {type(embedding).__name__} "
        f"{tuple(embedding.shape)} {embedding.dtype}, checksum {mine}"
    )
    ids = encode(vocab, "The main rank waits for every other rank")
    say(f"encoded: {ids}")

    expected = main_checksum(vocab)
    if mine != expected:
        raise RuntimeError(f"rank {sd.rank()} holds {mine}, the main rank {expected}")
    say(f"checksum agrees with rank 0: {expected}")


if __name__ == "__main__":
    main()
