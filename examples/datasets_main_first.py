"""Hugging Face datasets: the main rank tokenizes, the others load its cache.

    torchrun --standalone --nproc-per-node 2 examples/datasets_main_first.py --dir /tmp/sd-datasets
    python examples/datasets_main_first.py --dir /tmp/sd-datasets   # one process, Null backend

Needs ``pip install datasets`` (the ``examples`` extra).  No hub is contacted:
the example writes a small CSV corpus itself and loads it with the ``csv``
builder.

``load_and_tokenize`` runs under ``@sd.main_first(local=True)``: each node's
LOCAL_RANK 0 loads the CSV and runs ``.map(tokenize)``, which writes the
result to datasets' cache; the other ranks run the very same code afterwards
and ``.map()`` finds that cache file and loads it instead of tokenizing again.

That only works if ``.map()`` computes the same fingerprint on every rank.
datasets fingerprints the function by pickling it with dill, together with
the globals it uses, so ``tokenize`` must not use a global whose value
differs between ranks (the rank, a per-rank path, a counter, a tokenizer
object with per-process state).  dill pickles standard-library and
site-packages modules by name, but a module it finds elsewhere (a source
checkout, an editable install, your own package) by value, with all its
globals: ``tokenize`` calling ``sd.rank()`` cannot even be hashed with
syncdeco installed ``-e``, and datasets then uses a random fingerprint, so
every rank tokenizes again.  Python's ``hash()`` of a string differs between
processes (hash randomisation): token ids come from ``zlib.crc32``.

To show where each row was tokenized, ``tokenize`` records the rank that ran
it (torchrun's ``RANK``, read at run time) in a ``tokenized_by`` column;
every rank prints whether its ``.map()`` computed or loaded from the cache,
and which ranks its rows came from.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import tempfile
import zlib
from pathlib import Path
from typing import Any

import datasets  # type: ignore[import-untyped]

import syncdeco as sd

VOCAB_SIZE = 1000
WORD = re.compile(r"[a-z']+")
ROWS = 240


def say(message: str) -> None:
    # One write per line (newline included), so that lines from different
    # ranks do not interleave, even with PYTHONUNBUFFERED set.
    print(f"[rank {sd.rank()}/{sd.world_size()}] {message}\n", end="", flush=True)


def tokenize(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """A toy tokenizer: lower-cased words, ids from crc32.

    Everything it uses (``WORD``, ``VOCAB_SIZE``, the ``zlib`` and ``os``
    modules) pickles the same on every rank, so the fingerprint is the same.
    """
    rank = int(os.environ.get("RANK", "0"))  # for the demonstration only
    ids = [
        [zlib.crc32(word.encode()) % VOCAB_SIZE for word in WORD.findall(text.lower())]
        for text in batch["text"]
    ]
    return {"input_ids": ids, "tokenized_by": [rank] * len(ids)}


def write_corpus(path: Path) -> None:
    """A small CSV corpus, the same every time (rewriting it would change its
    modification time and with it the fingerprint of everything built on it)."""
    words = "the quick brown fox jumps over a lazy dog while ranks wait for main".split()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        for i in range(ROWS):
            text = " ".join(words[(i * 7 + k * 3) % len(words)] for k in range(5 + i % 11))
            writer.writerow([i, text.capitalize() + "."])
    os.replace(tmp, path)


def map_cache_files(directory: Path) -> set[str]:
    return {p.name for p in directory.glob("cache-*.arrow")}


@sd.main_first(local=True)
def load_and_tokenize(directory: Path) -> tuple[Any, bool]:
    """The node's main rank writes the corpus, loads it and tokenizes it,
    filling the cache; the others then load both from the cache.

    Returns the tokenized dataset and whether ``.map()`` loaded it from the
    cache (True) or computed it (False)."""
    corpus = directory / "corpus.csv"
    if sd.is_main(local=True) and not corpus.exists():
        write_corpus(corpus)
    raw = datasets.load_dataset(
        "csv", data_files=str(corpus), split="train", cache_dir=str(directory / "hf-cache")
    )
    arrow_dir = Path(raw.cache_files[0]["filename"]).parent
    before = map_cache_files(arrow_dir)
    tokenized = raw.map(tokenize, batched=True, batch_size=64, remove_columns=["text"])
    cache_file = Path(tokenized.cache_files[0]["filename"]).name
    return tokenized, cache_file in before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "syncdeco-datasets",
        help="where the corpus and the datasets cache go (default: %(default)s)",
    )
    args = parser.parse_args()
    datasets.disable_progress_bars()

    tokenized, from_cache = load_and_tokenize(args.dir)
    cache_file = Path(tokenized.cache_files[0]["filename"]).name
    if from_cache:
        say(f"map: loaded {cache_file} from the cache, tokenized nothing")
    else:
        say(f"map: tokenized {tokenized.num_rows} rows, wrote {cache_file}")
    by = sorted(set(tokenized["tokenized_by"]))
    tokens = sum(len(ids) for ids in tokenized["input_ids"])
    say(f"{tokenized.num_rows} rows, {tokens} tokens, tokenized by rank(s) {by}")

    sd.barrier("done")
    say("done")


if __name__ == "__main__":
    main()
