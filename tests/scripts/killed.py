"""Rank 1 is killed (SIGKILL, as by the out-of-memory killer) while the
others wait for it at a sync point with no timeout.

    torchrun --nproc-per-node 3 --monitor-interval 60 killed.py DIR

torchrun looks at its workers once a minute here, so it does not stop the
survivors before they have heard of the kill from syncdeco.  Fail-fast is
off: a survivor not yet at "end of epoch" when the kill comes would end at
once instead (docs/hangs.md), and this shows what the sync point says.
"""

import os
import signal
import sys
import time
from pathlib import Path

import syncdeco as sd

killed_at = Path(sys.argv[1]) / "killed-at"
sd.init(fail_fast=False)  # the first sync point: every rank's group is up after it
sd.barrier("warm up")
if sd.rank() == 1:
    killed_at.write_text(repr(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)
try:
    sd.barrier("end of epoch", timeout=None)
except sd.RankKilledError as exc:
    took = time.time() - float(killed_at.read_text())
    # one write per line, so that two ranks' lines never run together
    said = f"{type(exc).__name__} {took:.2f}s after the kill: {exc}"
    print(f"[rank {sd.rank()}] {said}\n", end="", flush=True)
