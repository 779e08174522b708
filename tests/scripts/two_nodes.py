"""Run by test_torchrun.py under two torchrun agents (--nnodes 2, two
processes each) on loopback.  Shows that main_first(local=True) lets LOCAL_RANK
0 of each node go first and waits only within the node.  Then each rank
lists the TCP ports it listens on (syncdeco's own stores, and torch's process
group), and the same again once plain torch has made a second group."""

import json
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist
from listeners import listening

import syncdeco as sd
from syncdeco._plane import group

out = Path(sys.argv[1])
node = os.environ["GROUP_RANK"]


def wait_for(path: Path, what: str) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {sd.rank()}: {what} never happened")
        time.sleep(0.01)


@sd.main_first(local=True)
def fill_node_cache() -> bool:
    saw = (out / f"cache-node{node}").exists()
    if sd.is_main(local=True):
        if node == "0":
            # Node 0's main holds its node back until node 1 has finished
            # main_first entirely: a global wait here would deadlock.
            wait_for(out / "done-rank3", "node 1 finishing main_first")
        (out / f"cache-node{node}").write_text("ok")
    return saw


saw = fill_node_cache()
(out / f"done-rank{sd.rank()}").write_text("ok")
sd.barrier("end")
facts = {
    "rank": sd.rank(),
    "local_rank": sd.local_rank(),
    "node": node,
    "is_local_main": sd.is_main(local=True),
    "is_main": sd.is_main(),
    "saw_cache": saw,
}
# Every store is up (each node's main hosts its node's): where this process
# listens, which of those ports are syncdeco's own, and where a process
# group plain torch makes listens.
made = session.exchange if (session := group.current()) is not None else None
hosted = made.hosted if made is not None else None
facts["listening"] = listening()
facts["syncdeco_ports"] = [] if hosted is None else [hosted[1]]
torch_group = dist.new_group(backend="gloo")
dist.barrier(group=torch_group)
facts["listening_with_a_torch_group"] = listening()
(out / f"rank{sd.rank()}.json").write_text(json.dumps(facts))
