"""Rank 0 raises inside a main_first at the job's first sync point (no
process group exists yet); rank 1 hears of it there.  Neither catches its
error: each ends with a traceback on stderr.

    RANK=... WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... python first_failure.py
"""

import syncdeco as sd


@sd.main_first
def download_dataset() -> None:
    if sd.is_main():
        raise ConnectionError("HTTP 503 from the dataset mirror")


download_dataset()
