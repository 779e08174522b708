"""One rank's process ends while the others go on to a sync point it never
reaches.  Run as plain processes with torchrun's variables (no agent that
would stop the others): ``python exits.py SCENARIO``.

Scenarios: ``member_raises`` (rank 1 raises outside any sync point),
``main_returns`` (rank 0's program ends early), ``local_member_exits``
(rank 3, on the second node, calls sys.exit() before a local sync point).
"""

from __future__ import annotations

import sys

import syncdeco as sd


def say(msg: str) -> None:
    print(f"[rank {sd.rank()}] {msg}\n", end="", flush=True)


def meet(name: str, local: bool) -> None:
    if local:
        with sd.main_first(local=True, name=name, timeout=300):
            pass
    else:
        sd.barrier(name, timeout=300)


def main(scenario: str) -> None:
    local = scenario.startswith("local")
    meet("start", local)
    leaving = {"member_raises": 1, "main_returns": 0, "local_member_exits": 3}[scenario]
    if sd.rank() == leaving:
        if scenario == "member_raises":
            raise OSError("disk full while writing shard 7")
        if scenario == "local_member_exits":
            sys.exit(0)
        return
    try:
        meet("next", local)
    except sd.RankExitedError as exc:
        say(f"{type(exc).__name__} rank={exc.rank} exc_type={exc.exc_type!r}: {exc}")
    else:
        say("passed the barrier")


if __name__ == "__main__":
    main(sys.argv[1])
