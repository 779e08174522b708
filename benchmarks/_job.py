"""A benchmark script's 2-rank job: the script run again under torchrun on
this machine, told what to do through one environment variable, each rank
writing what it measured to ``rank<N>.json`` in a folder made for the job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def two_ranks(script: str, variable: str, value: str, timeout: float) -> list[Any]:
    """Run ``script`` on 2 Gloo ranks with ``variable`` set to ``value``
    followed by the job's folder; returns what rank 0 and rank 1 wrote."""
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": "1", variable: f"{value} {out}"}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc-per-node", "2", script]
        job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        if job.returncode != 0:
            raise SystemExit(f"the job failed ({job.returncode}):\n{job.stdout}\n{job.stderr}")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in (0, 1)]
