"""One rank, run by test_share.py inside a mount namespace whose /dev/shm
is a small tmpfs: builds a share=True result too large for that /dev/shm
(``sys.argv[1]`` MiB) and a small one that fits, and prints what it got."""

from __future__ import annotations

import hashlib
import json
import logging
import sys

BIG_MIB = int(sys.argv[1])


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


rank_main()
