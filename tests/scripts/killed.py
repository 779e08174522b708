"""Run by test_torchrun.py under torchrun with a slow monitor: rank 1 is
SIGKILLed (as by the out-of-memory killer) while the others wait for it at
a sync point with no timeout."""

import os
import signal
import sys
import time
from pathlib import Path

import syncdeco as sd

tmp = Path(sys.argv[1])
sd.barrier("warm up")
if sd.rank() == 1:
    (tmp / "killed-at").write_text(repr(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)
try:
    sd.barrier("end of epoch", timeout=None)
except sd.RankKilledError as exc:
    took = time.time() - float((tmp / "killed-at").read_text())
    # One write per line: two ranks' prints ran together in one line once.
    line = f"[rank {sd.rank()}] named rank {exc.rank} within {took:.2f}s: {exc}\n"
    print(line, end="", flush=True)
