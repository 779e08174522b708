"""syncdeco quickstart.

    torchrun --nproc-per-node 4 examples/quickstart.py   # 4 Gloo ranks on this machine
    python examples/quickstart.py                        # one process, Null backend

Each rank prints what it did.  The last part makes the main rank fail on
purpose and shows what every rank sees instead of a hang.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import syncdeco as sd

CACHE = Path(tempfile.gettempdir()) / "syncdeco-quickstart"


def say(message: str) -> None:
    # One write per line, newline included, so that ranks' lines never run
    # together (print writes the text and the newline apart when unbuffered).
    print(f"[rank {sd.rank()}/{sd.world_size()}] {message}\n", end="", flush=True)


@sd.main_first(local=True)
def load_dataset() -> list[int]:
    """The node's main rank builds the cache; the others then read it."""
    path = CACHE / "dataset.json"
    if sd.is_main(local=True):
        CACHE.mkdir(exist_ok=True)
        path.write_text(json.dumps(list(range(100))))  # pretend: download + tokenize
        say("built the dataset cache")
    data: list[int] = json.loads(path.read_text())
    return data


@sd.on_main_only(broadcast=True)
def build_vocab() -> dict[str, int]:
    """Only the main rank builds it; every rank gets the main rank's copy."""
    return {"<pad>": 0, "<unk>": 1, "hello": 2}


@sd.barrier_after(every=10)
def train_step(step: int, data: list[int]) -> int:
    """Every rank trains; all ranks sync every 10th step."""
    return sum(data[step % len(data) :][:8])


@sd.barrier_after
@sd.on_main_only
def save_checkpoint(step: int) -> Path:
    """The main rank saves; everybody waits until it is written."""
    path = CACHE / f"ckpt-{step}.json"
    path.write_text(json.dumps({"step": step}))
    say(f"saved {path.name}")
    return path


@sd.on_main_only(broadcast=True)
def validate() -> float:
    raise ValueError("validation set is empty")


def main() -> None:
    data = load_dataset()
    vocab = build_vocab()
    say(f"{len(data)} examples, vocab of {len(vocab)}")
    for step in range(1, 31):
        train_step(step, data)
    saved = save_checkpoint(30)
    say(f"after the save: {saved or 'the main rank saved it'}")

    try:
        validate()
    except sd.PeerFailedError as err:
        say(f"PeerFailedError: rank {err.rank} raised {err.exc_type}: {err.message}")
    except ValueError as err:
        say(f"my own ValueError: {err}")
    sd.barrier("done")  # the group still works after the failure
    say("done")


if __name__ == "__main__":
    main()
