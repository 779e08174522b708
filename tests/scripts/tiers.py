"""Run by test_tier.py under two torchrun agents (--nnodes 2, two processes
each, a slow monitor): a job of two nodes that syncs through a store per
node.  Each rank checks the ordinary promises through the tier, then rank
``argv[2]`` is SIGKILLed while the others wait with no timeout."""

import json
import os
import signal
import sys
import time
from pathlib import Path

import syncdeco as sd
from syncdeco._plane import group

out, victim = Path(sys.argv[1]), int(sys.argv[2])
rank = sd.rank()
facts: dict[str, object] = {"rank": rank}

sd.barrier("start")  # the first sync point: every rank has met, the group is made
sd.barrier("up")  # the next one goes through the nodes' stores
made = session.exchange if (session := group.current()) is not None else None
tier = made.tier if made is not None else None
facts["tier"] = None if tier is None else [tier.main, list(tier.members), list(tier.slots)]


@sd.on_main_only(broadcast=True)
def vocabulary() -> dict[str, int]:
    return {"size": 32000}


facts["result"] = vocabulary()


@sd.barrier_after(timeout=60)
def load_shard() -> None:
    if rank == 3:
        raise ValueError("shard 3 is corrupt")


try:
    load_shard()
    facts["failure"] = None
except sd.PeerFailedError as exc:
    facts["failure"] = ["PeerFailedError", exc.rank]
except ValueError as exc:
    facts["failure"] = ["own", str(exc)]


@sd.main_first(local=True)
def fill_node_cache() -> bool:
    return sd.is_main(local=True)


facts["node_first"] = fill_node_cache()
sd.barrier("after the failure")
(out / f"rank{rank}.json").write_text(json.dumps(facts))

if rank == victim:
    (out / "killed-at").write_text(repr(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)
try:
    sd.barrier("end of epoch", timeout=None)
except sd.RankKilledError as exc:
    took = time.time() - float((out / "killed-at").read_text())
    print(f"[rank {rank}] named rank {exc.rank} within {took:.2f}s: {exc}\n", end="", flush=True)
