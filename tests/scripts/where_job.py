"""A job stuck as hung jobs are, for ``python -m syncdeco where``: rank 3
in a function of its own that never returns, the others in a Gloo
``all_reduce`` that waits for it.

    torchrun --nproc-per-node 4 where_job.py DIR

Each rank writes its pid to DIR/ready-RANK just before it gets stuck.  It
never ends by itself: the test that starts it kills it.
"""

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import syncdeco as sd

folder = Path(sys.argv[1])


def read_shard(path: Path) -> None:
    while not path.exists():  # never written
        time.sleep(0.05)


def step() -> None:
    grads = torch.ones(4)
    dist.all_reduce(grads)


sd.barrier("start")  # syncdeco's first sync point: it makes the process group
(folder / f"ready-{sd.rank()}").write_text(str(os.getpid()))
if sd.rank() == 3:
    read_shard(folder / "shard-3")
else:
    step()
