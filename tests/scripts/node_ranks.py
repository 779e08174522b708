"""One rank of a job on the network-namespace cluster of test_multinode.py
(tests/netns.py), under torchrun or SLURM variables.

    node_ranks.py OUT [--timeout SECONDS|none] [--busy RANK ...] [--gil RANK SECONDS]

Every rank passes two sync points, writes ``OUT/ready-<rank>.json`` (its
pid, host name, node address, launcher's node id), then waits at
``sd.barrier("wait", timeout=...)`` (``none``: no timeout, the default);
except the ``--busy`` ranks, which stay busy (in Python, their threads
running) and never come: the test loses them while the others wait.
What that barrier did goes to ``OUT/result-<rank>.json``: ``"passed"``, or
``"raised"`` with the error's type, message, the ranks it names and the
wall-clock time (``time.time()``) it was raised, so that a test measures
"named within 10 s of the loss".  A rank that passed meets the others once
more at ``sd.barrier("after")`` and writes ``OUT/done-<rank>.json``.

``--gil RANK SECONDS``: rank RANK, once ``OUT/go`` exists, holds the GIL for
SECONDS in a C call (libc ``sleep`` through ``ctypes.PyDLL``, which keeps
the GIL) before it comes to the barrier: none of its threads runs meanwhile.

SIGUSR1 writes every thread's stack to ``OUT/stacks-<pid>.txt``: where a
survivor waits when the test gives up.
"""

import argparse
import ctypes
import faulthandler
import json
import os
import signal
import socket
import time
from pathlib import Path

import syncdeco as sd

parser = argparse.ArgumentParser()
parser.add_argument("out", type=Path)
parser.add_argument("--timeout", default="none")
parser.add_argument("--busy", nargs="+", type=int, default=[], metavar="RANK")
parser.add_argument("--gil", nargs=2, type=int, metavar=("RANK", "SECONDS"))
args = parser.parse_args()
out: Path = args.out
timeout = None if args.timeout == "none" else float(args.timeout)


def write(name: str, facts: dict[str, object]) -> None:
    """Write ``OUT/name`` whole or not at all (the test polls for it)."""
    tmp = out / f".{name}.tmp"
    tmp.write_text(json.dumps(facts))
    os.replace(tmp, out / name)


def node_address() -> str:
    """The address this node reaches rank 0's store from (a UDP connect
    sends nothing: it only picks the route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((os.environ["MASTER_ADDR"], 9))
        return str(s.getsockname()[0])


stacks = open(out / f"stacks-{os.getpid()}.txt", "w")  # open till the end
faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)

sd.barrier("warm-up")
sd.barrier("warm-up 2")
rank = sd.rank()
write(
    f"ready-{rank}.json",
    {
        "rank": rank,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "addr": node_address(),
        "node": os.environ.get("GROUP_RANK", os.environ.get("SLURM_NODEID")),
        "local_rank": sd.local_rank(),
    },
)

if args.gil is not None and args.gil[0] == rank:
    deadline = time.monotonic() + 120
    while not (out / "go").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: the test never wrote {out / 'go'}")
        time.sleep(0.01)
    write(f"gil-{rank}.json", {"from": time.time()})
    ctypes.PyDLL(None).sleep(args.gil[1])  # a C call that keeps the GIL
    write(f"gil-{rank}.json", {"to": time.time()})

if rank in args.busy:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # "computing" until the test loses this rank
        time.sleep(0.05)
    raise SystemExit(f"rank {rank}: busy for 600 s and never lost")

try:
    sd.barrier("wait", timeout=timeout)
except BaseException as exc:
    names = {
        key: getattr(exc, key)
        for key in ("rank", "ranks", "missing", "lost")
        if isinstance(getattr(exc, key, None), (int, list, tuple))
    }
    write(
        f"result-{rank}.json",
        {
            "rank": rank,
            "outcome": "raised",
            "time": time.time(),
            "type": type(exc).__name__,
            "sync_error": isinstance(exc, sd.SyncError),
            "message": str(exc),
            "names": names,
        },
    )
    print(f"[rank {rank}] raised {type(exc).__name__}: {exc}", flush=True)
    raise SystemExit(1) from None
write(f"result-{rank}.json", {"rank": rank, "outcome": "passed", "time": time.time()})
sd.barrier("after")
write(f"done-{rank}.json", {"rank": rank, "time": time.time()})
