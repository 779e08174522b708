"""Run by test_frameworks.py: Hugging Face Accelerate sets up the Gloo process
group, then syncdeco syncs over it.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        accelerate_ranks.py OUT_DIR {ok|fail|ok,fail|fail,ok}
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist
from accelerate import PartialState
from framework_checks import run_checks, say

import syncdeco as sd

state = PartialState(cpu=True, backend="gloo")
say(
    f"accelerate process_index={state.process_index} num_processes={state.num_processes} "
    f"local_process_index={state.local_process_index} "
    f"distributed_type={state.distributed_type.value} group backend={dist.get_backend()}"
)
assert dist.is_initialized(), "PartialState did not initialise the process group"
assert (sd.rank(), sd.world_size()) == (state.process_index, state.num_processes)
assert sd.local_rank() == state.local_process_index
assert sd.is_main() == state.is_main_process
say("syncdeco agrees with PartialState")

run_checks(Path(sys.argv[1]), sys.argv[2])
