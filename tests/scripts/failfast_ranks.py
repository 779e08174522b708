"""One rank of a fail-fast job (tests/test_failfast.py), started as a
launcher would start it (RANK, WORLD_SIZE, ... in its environment; no group
made in advance).

    failfast_ranks.py OUT [--gil RANK SECONDS] [--busy RANK ...] [--wait RANK ...]
                          [--init] [--debug]

With ``--init``, every rank first calls ``sd.init(fail_fast=True)`` (which
wins over ``SYNCDECO_FAIL_FAST``).  Every rank meets the others at
``sd.barrier("ready")`` (which also makes the Gloo group), writes
``OUT/ready-<rank>.json`` (its pid), then, outside any syncdeco sync
point, waits for ``OUT/go-<n>`` (the test writes it once
it has made its fault), writes ``OUT/in-<n>-<rank>`` and:

* round 1: every rank runs ``dist.all_reduce``, then writes
  ``OUT/round-1-<rank>``; except the ``--busy`` ranks, which compute
  instead (the others' all_reduce then ends only with fail-fast); and the
  ``--wait`` ranks, which wait for ``OUT/go-2`` instead (a user's loop,
  which no collective's failure can end), then meet at
  ``sd.barrier("after")``: a ``SyncError`` there is printed
  (``sync point raised: ...``) and ends the rank with exit code 3;
* round 2 (3 ranks): rank 0 runs ``dist.all_reduce`` over a group of ranks
  0 and 1, which rank 1 never joins: it computes; rank 2 waits to be
  killed.  Nothing ends round 2 but fail-fast (or the 120 s deadline).

Every wait has a deadline of its own.  ``--debug``: syncdeco's debug log on
standard error (the test reads when a watcher judged a node lost).

``--gil RANK SECONDS``: before round 1, rank RANK holds the GIL for
SECONDS in a C call (libc ``sleep`` through ``ctypes.PyDLL``): none of its
threads runs meanwhile.
"""

import argparse
import ctypes
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import syncdeco as sd

parser = argparse.ArgumentParser()
parser.add_argument("out", type=Path)
parser.add_argument("--gil", nargs=2, type=int, metavar=("RANK", "SECONDS"))
parser.add_argument("--busy", nargs="+", type=int, default=[], metavar="RANK")
parser.add_argument("--wait", nargs="+", type=int, default=[], metavar="RANK")
parser.add_argument("--init", action="store_true")
parser.add_argument("--debug", action="store_true")
args = parser.parse_args()
out: Path = args.out
if args.debug:
    logging.basicConfig(format="%(message)s")
    logging.getLogger("syncdeco").setLevel(logging.DEBUG)

if args.init:
    sd.init(fail_fast=True, timeout=120)
sd.barrier("ready", timeout=120)
rank = sd.rank()
(out / f".ready-{rank}").write_text(json.dumps({"pid": os.getpid()}))
os.replace(out / f".ready-{rank}", out / f"ready-{rank}.json")

pair = dist.new_group([0, 1])  # every rank makes it


def go(n: int) -> None:
    deadline = time.monotonic() + 120
    while not (out / f"go-{n}").exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"rank {rank}: no {out / f'go-{n}'} within 120 s")
        time.sleep(0.01)
    (out / f"in-{n}-{rank}").write_text("")


def compute() -> None:
    deadline = time.monotonic() + 120
    total = 0
    while time.monotonic() < deadline:  # computing, or waiting to be killed
        total += sum(range(1000))
    raise SystemExit(f"rank {rank}: still running after 120 s")


go(1)
if rank in args.busy:
    compute()
if rank in args.wait:
    go(2)
    try:
        sd.barrier("after", timeout=60)
    except sd.SyncError as exc:
        print(f"sync point raised: {exc}", flush=True)
        sys.exit(3)
    sys.exit(0)
if args.gil is not None and args.gil[0] == rank:
    ctypes.PyDLL(None).sleep(args.gil[1])  # a C call that keeps the GIL
dist.all_reduce(torch.ones(1))
(out / f"round-1-{rank}").write_text("")

go(2)
if rank == 0:
    dist.all_reduce(torch.ones(1), group=pair)  # rank 1 never joins
compute()  # rank 1; rank 2 waits here to be killed
