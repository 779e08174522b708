"""Run by test_frameworks.py: Lightning Fabric sets up the Gloo process group,
then syncdeco syncs over it.

    python fabric_ranks.py OUT_DIR {ok|fail|ok,fail|fail,ok}

Fabric's launcher starts rank 1 itself, by running this script again with
LOCAL_RANK=1 (and WORLD_SIZE, NODE_RANK, MASTER_ADDR, MASTER_PORT, but no
RANK).  Under ``python -m torch.distributed.run --nproc-per-node 2`` instead,
Fabric finds torchrun's environment and starts nothing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch.distributed as dist
from framework_checks import run_checks, say
from lightning_fabric import Fabric

import syncdeco as sd

# Before fabric.launch() there is no process group yet.
try:
    before = f"{sd.rank()}/{sd.world_size()}"
except sd.LaunchEnvError as err:
    before = f"LaunchEnvError: {err}"
env = " ".join(f"{k}={os.environ.get(k)}" for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
print(f"[before fabric.launch(), {env}] syncdeco says {before}\n", end="", flush=True)

fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
fabric.launch()
say(
    f"fabric global_rank={fabric.global_rank} world_size={fabric.world_size} "
    f"local_rank={fabric.local_rank} group backend={dist.get_backend()} "
    f"environment={type(fabric._connector.cluster_environment).__name__}"
)
assert (sd.rank(), sd.world_size()) == (fabric.global_rank, fabric.world_size)
assert sd.local_rank() == fabric.local_rank
assert sd.is_main() == fabric.is_global_zero
say("syncdeco agrees with Fabric")

run_checks(Path(sys.argv[1]), sys.argv[2])
