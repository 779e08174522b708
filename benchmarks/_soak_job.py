"""One rank of a soak run; started by benchmarks/soak.py under torchrun.

Uses every decorator (``main_first``, global and per node; ``on_main_only``,
plain, ``broadcast=True`` and ``share=True``; ``barrier_after``), an
``async def`` sync point, and no process group made in advance: syncdeco
makes it.  Writes what this rank got to ``rank<N>.json`` in the folder
named on the command line; the driver compares it with what every rank
should have got, and checks the rank's exit.
"""

from __future__ import annotations

import asyncio
import faulthandler
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch

import syncdeco as sd

faulthandler.register(signal.SIGUSR1, all_threads=True)  # soak.py asks a hung run
out = Path(sys.argv[1])
mib = float(sys.argv[2])


def weights() -> dict[str, torch.Tensor]:
    n = max(1, int(mib * 2**20) // 4)
    return {"w": torch.arange(n, dtype=torch.float32), "b": torch.ones(3, dtype=torch.bfloat16)}


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@sd.main_first
def prepare() -> int:
    return sd.rank()


@sd.main_first(local=True)
def prepare_node() -> int:
    return sd.local_rank()


@sd.on_main_only
def log() -> str:
    return "logged"


@sd.on_main_only(broadcast=True)
def config() -> dict[str, int]:
    return {"world": sd.world_size()}


@sd.on_main_only(broadcast=True, share=True)
def shared() -> dict[str, torch.Tensor]:
    return weights()


@sd.on_main_only(broadcast=True, share=True, local=True)
def shared_node() -> dict[str, torch.Tensor]:
    return weights()


@sd.barrier_after
def step(i: int) -> int:
    return i


@sd.on_main_only(broadcast=True, share=True)
async def fetched() -> dict[str, torch.Tensor]:
    await asyncio.sleep(0)
    return weights()


async def main() -> dict[str, torch.Tensor]:
    return await fetched()


prepare()
prepare_node()
logged = log()
cfg = config()
got = shared()
got_node = shared_node()
for i in range(3):
    step(i)
got_async = asyncio.run(main())
facts = {
    "rank": sd.rank(),
    "pid": os.getpid(),
    "logged": logged,
    "config": cfg,
    "digests": [digest(got), digest(got_node), digest(got_async)],
    "want": digest(weights()),
}
(out / f"rank{sd.rank()}.json").write_text(json.dumps(facts))
