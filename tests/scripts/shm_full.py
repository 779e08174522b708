"""Run by test_share.py inside a mount namespace whose /dev/shm is a small
tmpfs.  Without arguments after the folder: the driver, which hosts the
store (as torchrun's agent does) and starts two ranks with torchrun's
variables, on one node, and reports each rank's exit and output and
what is left in /dev/shm.  With a rank: one rank, which builds a result
too large for that /dev/shm and a small one that fits."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

out = Path(sys.argv[1])
BIG_MIB = int(sys.argv[2])


def driver() -> None:
    import torch.distributed as dist

    from syncdeco.testing import launcher_env

    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)  # type: ignore[attr-defined]
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            **launcher_env("torchrun", rank, 2, 2),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(store.port),
            "TORCHELASTIC_RESTART_COUNT": "0",
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, str(out), str(BIG_MIB), str(rank)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    report = {}
    for rank, proc in enumerate(procs):
        try:
            text, _ = proc.communicate(timeout=100)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
                p.wait()
            raise
        report[rank] = [proc.returncode, text.decode(errors="replace")]
    report["shm"] = sorted(os.listdir("/dev/shm"))  # type: ignore[assignment]
    print(json.dumps(report))


def rank_main() -> None:
    import torch

    import syncdeco as sd

    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("syncdeco").addHandler(handler)

    def digest(t: torch.Tensor) -> str:
        return hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()

    def big_value() -> torch.Tensor:
        return torch.arange(BIG_MIB * 2**20 // 8, dtype=torch.float64)

    @sd.on_main_only(broadcast=True, share=True)
    def big() -> torch.Tensor:
        return big_value()

    @sd.on_main_only(broadcast=True, share=True)
    def small() -> torch.Tensor:
        return torch.ones(1000)

    got = big()
    again = big()
    little = small()
    sd.barrier("done")
    facts = {
        "rank": sd.rank(),
        "right": digest(got) == digest(big_value()) and digest(again) == digest(got),
        "big_file": got.untyped_storage().filename,
        "small_file": little.untyped_storage().filename,
        "small_right": little.tolist() == [1.0] * 1000,
        "said": said,
    }
    print("FACTS " + json.dumps(facts), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 3:
        rank_main()
    else:
        driver()
