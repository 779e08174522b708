"""A 2-rank small broadcast result, built up layer by layer, in one job.

    python benchmarks/layers.py                 # 7 interleaved rounds of 1000 calls
    python benchmarks/layers.py --rounds 3 --calls 200

It starts 2 Gloo ranks with torchrun on this machine and times, in
interleaved rounds, the same sync point with more of syncdeco each time:

* store floor: the requests alone (``_worker.floor_step``: the member
  ``set``\\ s its key, the main ``multi_get``\\ s it and ``set``\\ s the answer,
  the member ``get``\\ s it), with tiny values;
* + deletes: with the two deletes that keep the store from growing;
* + codec: with syncdeco's frame and verdict as they travel (pickled; the
  result pickled inside the verdict, read back on the member), the
  connection's timeout set before each wait, and nothing else;
* Exchange.sync: the sync plane's whole exchange, called directly;
* decorator: ``@sd.on_main_only(broadcast=True)``, as a user calls it;

next to ``broadcast_object_list`` of the same result, its peer in
``benchmarks/run.py``.  Per layer: the median µs per call [its range over
the rounds], the ratio of the medians to ``broadcast_object_list``, and
each rank's CPU per call (its main thread).  On 2 shared cores the store's
server (torchrun's agent) is a third process on them: see
docs/performance.md for what the figures say.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from _job import two_ranks

from syncdeco._plane import wire
from syncdeco._plane.frames import Frame, Ok, dump_frame, dump_verdict, load_frame, load_verdict

FOREVER = timedelta(seconds=3600)  # what a sync point with no timeout sets
SMALL = {"vocab": ["<pad>", "<unk>", "hello", "world"] * 20, "size": 80}
LAYERS = ("store floor", "+ deletes", "+ codec", "Exchange.sync", "decorator")
PEER = "broadcast_object_list"


def codec_step(store: Any, rank: int, base: str, i: int) -> None:
    """Call ``i`` of the store's requests with syncdeco's frame and verdict
    codec and its deletes, on ``rank`` of 2, and nothing else of syncdeco;
    in the exchange's order (the main encodes its verdict before it waits)."""
    if rank == 0:
        if i > 1:
            store.delete_key(f"{base}/d/{i - 2}")
        verdict = dump_verdict(Ok(i, wire.dumps(SMALL, []), ("b", [])))
        store.set_timeout(FOREVER)
        [load_frame(f) for f in store.multi_get([f"{base}/u/{i}/1"])]
        store.set(f"{base}/d/{i}", verdict)
    else:
        where = "on_main_only small #1 (layers.py:1)"
        frame = Frame(i, 1, "on_main_only", "small", i, None, where, None)
        store.set(f"{base}/u/{i}/1", dump_frame(frame))
        if i > 0:
            store.delete_key(f"{base}/u/{i - 1}/1")
        store.set_timeout(FOREVER)
        got = load_verdict(bytes(store.get(f"{base}/d/{i}")))
        pickle.loads(got.data)  # type: ignore[union-attr, arg-type]


def rank_side(rounds: int, calls: int, out: str) -> None:
    """One rank of the job: every layer and the peer, in interleaved rounds."""
    import torch.distributed as dist
    from _worker import floor_step

    import syncdeco as sd
    from syncdeco._backend import SyncPoint
    from syncdeco._plane import group

    sd.init(backend="gloo")
    rank = sd.rank()

    @sd.on_main_only(broadcast=True)
    def small() -> object:
        return SMALL

    store = dist.distributed_c10d._get_default_store().clone()
    store.set_timeout(timedelta(seconds=600))
    exchange = group.current_session(os.environ).exchange
    count = [0]

    def exchange_sync(i: int) -> object:
        count[0] += 1
        point = SyncPoint("on_main_only", "layers", count[0], "layers.py:1", "layers.py:2")
        return exchange.sync(point, False, None, SMALL if rank == 0 else None, None)

    def peer(i: int) -> object:
        box = [SMALL if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def cases(r: int) -> dict[str, Callable[[int], object]]:
        return {
            "store floor": lambda i: floor_step(store, rank, 2, f"f{r}", i, cleanup=False),
            "+ deletes": lambda i: floor_step(store, rank, 2, f"d{r}", i, cleanup=True),
            "+ codec": lambda i: codec_step(store, rank, f"c{r}", i),
            "Exchange.sync": exchange_sync,
            "decorator": lambda i: small(),
            PEER: peer,
        }

    times: dict[str, list[tuple[float, float]]] = {}
    for r in range(rounds + 1):  # the first round warms up, and is not kept
        for name, call in cases(r).items():
            sd.barrier("round")
            wall, cpu = time.perf_counter(), time.thread_time()
            for i in range(calls):
                call(i)
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            if r:
                times.setdefault(name, []).append((wall / calls * 1e6, cpu / calls * 1e6))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(times, f)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args()
    main_rank, member = two_ranks(__file__, "LAYERS", f"{args.rounds} {args.calls}", 1200)
    peer = statistics.median(wall for wall, _ in main_rank[PEER])
    print("| layer | µs per call [range] | / broadcast_object_list | main CPU µs | member CPU µs |")
    print("|---|---|---|---|---|")
    for name in (*LAYERS, PEER):
        walls = [wall for wall, _ in main_rank[name]]
        median = statistics.median(walls)
        cpu = [statistics.median(c for _, c in side[name]) for side in (main_rank, member)]
        print(f"| {name} | {median:.0f} [{min(walls):.0f}-{max(walls):.0f}] "
              f"| {median / peer:.2f}x | {cpu[0]:.0f} | {cpu[1]:.0f} |")  # fmt: skip


if __name__ == "__main__":
    if "LAYERS" in os.environ:
        rounds, calls, out = os.environ["LAYERS"].split(" ", 2)
        rank_side(int(rounds), int(calls), out)
    else:
        main()
