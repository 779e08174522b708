"""A process that answers stack requests while its main thread is somewhere
known, for tests/test_stacks.py: ``python stack_child.py MODE PORT RANK DIR``.

It connects to the test's TCPStore, starts a StackResponder, and then, by
MODE (each step writes ``DIR/<step>`` when it starts, and waits for a byte on
the FIFO ``DIR/release`` to go on):

- ``sleep``: waits inside ``load_batch`` (without the GIL), then exits 0.
- ``gil``: waits inside ``decode_huge`` in a C call that holds the GIL.
- ``phases``: waits inside ``phase_one``, then inside ``phase_two``.
- ``exit``: waits inside ``finish`` and returns from the program.
- ``host``: like ``exit``, but answers through a store it serves itself (as
  rank 0 does under SLURM or mpirun), which ends with the interpreter.

The line where each one waits carries the comment ``# waits: <function>``.
"""

from __future__ import annotations

import ctypes
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from syncdeco._plane.stacks import StackResponder

PREFIX = "test/stacks"


def enter(step: str) -> int:
    fd = os.open(DIR / "release", os.O_RDWR)  # a FIFO: never blocks to open
    (DIR / step).touch()
    return fd


def load_batch() -> None:
    fd = enter("load_batch")
    os.read(fd, 1)  # waits: load_batch


def decode_huge() -> None:
    fd = enter("decode_huge")
    buf = ctypes.create_string_buffer(1)
    ctypes.PyDLL(None).read(fd, buf, 1)  # waits: decode_huge


def phase_one() -> None:
    fd = enter("phase_one")
    os.read(fd, 1)  # waits: phase_one


def phase_two() -> None:
    fd = enter("phase_two")
    os.read(fd, 1)  # waits: phase_two


def finish() -> None:
    fd = enter("finish")
    os.read(fd, 1)  # waits: finish


if __name__ == "__main__":
    mode, port, rank, folder = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    DIR = Path(folder)
    if mode == "host":
        server = dist.TCPStore(
            "127.0.0.1", 0, 1, True, timedelta(seconds=60), wait_for_workers=False
        )
        port = server.port
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    responder = StackResponder(store, PREFIX, rank)
    responder.start()
    try:  # until it has said in the store that it answers, seen on another connection
        probe = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
        probe.wait([f"{PREFIX}/{rank}/who"])
    except Exception as exc:
        sys.exit(f"the responder did not start: {exc!r}")
    if mode == "sleep":
        load_batch()
    elif mode == "gil":
        decode_huge()
    elif mode == "phases":
        phase_one()
        phase_two()
    elif mode in ("exit", "host"):
        finish()
    else:
        sys.exit(f"unknown mode {mode!r}")
