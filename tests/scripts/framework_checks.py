"""The syncdeco checks that accelerate_ranks.py and fabric_ranks.py run once
their framework has set up the process group.  Imported from the scripts'
own directory (Python puts it on sys.path).

Every rank prints ``[rank R/W] ...`` lines for test_frameworks.py to check;
files in the output directory order the events (no sleeps).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import syncdeco as sd

TIMEOUT = 60  # seconds: a broken sync point raises SyncTimeoutError, never hangs


def say(text: str) -> None:
    # One write per line, newline included: two ranks share the output, and
    # with PYTHONUNBUFFERED print writes the text and the newline apart.
    print(f"[rank {sd.rank()}/{sd.world_size()}] {text}\n", end="", flush=True)


def wait_for(path: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {sd.rank()}: {path.name} never appeared")
        time.sleep(0.005)


def run_checks(out: Path, modes: str) -> None:
    """Run the checks ``modes`` names, comma-separated, in that order:
    ``ok``: main_first, on_main_only(broadcast=True), barrier.
    ``fail``: the main rank raises inside main_first.
    One launch runs both (each launch starts processes that import torch and
    a framework); they share no file of the output directory."""
    checks = {"ok": _ok, "fail": _fail}
    for mode in modes.split(","):
        if mode not in checks:
            raise SystemExit(f"unknown mode {mode!r}")
        checks[mode](out)
        say(f"{mode} checks done")
    say("done")


def _ok(out: Path) -> None:
    @sd.main_first(timeout=TIMEOUT)
    def fill_cache() -> bool:
        """Main writes the cache; every rank says whether it was there on entry."""
        cache = out / "cache"
        found = cache.exists()
        if sd.is_main():
            # Hold the main rank until rank 1 is at main_first's door: had it
            # been let in early, it would have found no cache.
            wait_for(out / "rank1-at-main_first")
            cache.write_text(f"written by rank {sd.rank()}")
        return found

    @sd.on_main_only(broadcast=True, timeout=TIMEOUT)
    def build_vocab() -> dict[str, object]:
        with (out / "vocab-runs").open("a") as f:  # one line per run of the body
            f.write(f"rank {sd.rank()}\n")
        return {"built_by": sd.rank(), "pid": os.getpid(), "tokens": ["<pad>", "<unk>", "hi"]}

    if sd.rank() == 1:
        (out / "rank1-at-main_first").write_text("here")
    say(f"main_first: cache there on entry={fill_cache()}")

    vocab = build_vocab()
    say(f"on_main_only(broadcast=True) returned {vocab!r}")

    sd.barrier("vocab built", timeout=TIMEOUT)
    runs = (out / "vocab-runs").read_text().splitlines()
    say(f"after the barrier: vocab body ran {runs}")


def _fail(out: Path) -> None:
    @sd.main_first(timeout=TIMEOUT)
    def download() -> str:
        if sd.is_main():
            raise ConnectionError("HTTP 503 from the dataset mirror")
        (out / f"rank{sd.rank()}-ran-download").write_text("it should not have")
        return "downloaded"

    start = time.monotonic()
    try:
        download()
    except sd.PeerFailedError as err:
        say(f"PeerFailedError after {time.monotonic() - start:.1f}s: {err}")
        say(f"attributes rank={err.rank} exc_type={err.exc_type} message={err.message!r}")
        say(f"remote traceback ends with {err.remote_traceback.strip().splitlines()[-1]!r}")
    except ConnectionError as err:
        say(f"my own ConnectionError: {err}")
    sd.barrier("after the failure", timeout=TIMEOUT)
    say("the group still works")
