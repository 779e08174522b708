"""One rank of the benchmark; started by benchmarks/run.py under torchrun.

Measures each case and its peer in interleaved rounds (every case once per
round, in the same order on every rank) and writes per-call medians, in
microseconds, from rank 0 to the JSON file named on the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import statistics
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

import syncdeco as sd

Case = tuple[str, Callable[[], object], int]  # name, one call, calls per round


def floor_step(store: Any, rank: int, world: int, base: str, i: int, *, cleanup: bool) -> None:
    """Call ``i`` of the store's floor (see ``cases``), on ``rank``: members
    set their key, rank 0 reads them all with one multi_get and sets one
    answer that members get; with ``cleanup``, also the deletes syncdeco
    makes (each member its previous key, rank 0 the answer of two calls
    back)."""
    if rank == 0:
        if cleanup and i > 1:
            store.delete_key(f"{base}/d/{i - 2}")
        store.multi_get([f"{base}/u/{i}/{r}" for r in range(1, world)])
        store.set(f"{base}/d/{i}", b"ok")
    else:
        store.set(f"{base}/u/{i}/{rank}", b"here")
        if cleanup and i > 0:
            store.delete_key(f"{base}/u/{i - 1}/{rank}")
        store.get(f"{base}/d/{i}")


def cases(rank: int, iters: int, big_iters: int, tensor_mib: int) -> list[Case]:
    small = {"vocab": ["<pad>", "<unk>", "hello", "world"] * 20, "size": 80}
    big = torch.ones(tensor_mib * 2**20 // 4)  # float32

    @sd.barrier_after
    def step() -> None: ...

    @sd.main_first
    def load() -> None: ...

    @sd.on_main_only(broadcast=True)
    def small_result() -> dict[str, object]:
        return small

    @sd.on_main_only(broadcast=True)
    def tensor_result() -> torch.Tensor:
        return big

    @sd.on_main_only(broadcast=True, share=True)
    def shared_result() -> torch.Tensor:
        return big

    def shared_result_read() -> object:
        # every rank reads every page of its node's shared copy
        out = shared_result()
        out.sum()
        return out

    def bol_small() -> object:
        box = [small if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def bol_tensor() -> object:
        box = [big if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    buf = big.clone()

    def raw_broadcast() -> object:
        dist.broadcast(buf, src=0)
        return buf

    def raw_broadcast_new_buffer() -> object:
        # what a result costs at least: the receivers need fresh memory
        out = big if rank == 0 else torch.empty_like(big)
        dist.broadcast(out, src=0)
        return out

    # The floor of a sync point over the job's store (under torchrun, served
    # by the agent: a third process): each member sets its key, rank 0
    # reads them all with one multi_get (which waits) and sets one answer
    # that each member reads with a get (which waits), on a connection of
    # its own; no Python of syncdeco's.  "+ cleanup" also deletes keys as
    # syncdeco does: each member its previous key (after setting the
    # next), rank 0 the answer of two calls back (before reading; every
    # member has read it once its next key is there).  That is the least a
    # sync point of syncdeco's design costs.  Without cleanup the keys stay
    # (a benchmark's few thousand).  "queues" is the same exchange over the
    # store's queues, where a read takes the value away (a queue per member
    # and direction; rank 0 pops each member's in turn): no cleanup to do,
    # and no key left.  It is not syncdeco's design (a queue cannot be
    # looked at by another rank without taking from it, nor written "unless
    # something is there", which its exit and withdrawal rules need); it
    # shows what a sync point would gain without the cleanup's requests.
    floor = dist.distributed_c10d._get_default_store().clone()
    floor.set_timeout(timedelta(seconds=600))
    world = dist.get_world_size()
    trips = {"f": itertools.count(), "c": itertools.count()}

    def pop(key: str) -> None:
        while True:
            try:
                floor.queue_pop(key, block=True)
                return
            except dist.QueueEmptyError:
                pass  # the store's wait on a queue can return early: wait again

    def queues_floor() -> None:
        if rank == 0:
            for r in range(1, world):
                pop(f"floor/q/u/{r}")
            for r in range(1, world):
                floor.queue_push(f"floor/q/d/{r}", b"ok")
        else:
            floor.queue_push(f"floor/q/u/{rank}", b"here")
            pop(f"floor/q/d/{rank}")

    def store_floor(tag: str) -> None:
        floor_step(floor, rank, world, f"floor/{tag}", next(trips[tag]), cleanup=tag == "c")

    out: list[Case] = [
        ("store floor", functools.partial(store_floor, "f"), iters),
        ("store floor + cleanup", functools.partial(store_floor, "c"), iters),
        ("store floor, queues", queues_floor, iters),
        ("dist.barrier", dist.barrier, iters),
        ("sd.barrier", lambda: sd.barrier("bench"), iters),
        ("barrier_after", step, iters),
        ("main_first", load, iters),
        ("broadcast_object_list small", bol_small, iters),
        ("on_main_only(broadcast) small", small_result, iters),
        ("dist.broadcast tensor", raw_broadcast, big_iters),
        ("dist.broadcast tensor, new buffer", raw_broadcast_new_buffer, big_iters),
        ("broadcast_object_list tensor", bol_tensor, big_iters),
        ("on_main_only(broadcast) tensor", tensor_result, big_iters),
        ("on_main_only(broadcast, share) tensor", shared_result, big_iters),
        ("on_main_only(broadcast, share) tensor, read", shared_result_read, big_iters),
    ]
    try:
        from accelerate import PartialState

        state = PartialState()  # the one main() created over this group
        assert state.num_processes == dist.get_world_size(), state

        def accelerate_main_first() -> None:
            with state.main_process_first():
                pass

        out.append(("accelerate main_process_first", accelerate_main_first, iters))
    except ImportError:
        pass
    return out


def _status() -> dict[str, float]:
    """This process's private and shared resident memory, in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssShmem"):
                out[key] = int(value.split()[0]) / 1024
    return out


def _shmem() -> float:
    """Shared memory in use on the machine, in MiB (every process's)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) / 1024
    return 0.0


def memory(rank: int, tensor_mib: int) -> dict[str, dict[str, float]]:
    """Memory the node holds for one tensor result, each way of handing it
    to every rank: the ranks' private growth (summed), the shared pages they
    map (the same pages on every rank: counted once, the largest growth) and
    the machine's Shmem growth, with every rank holding its result after
    reading all of it."""
    big = torch.ones(tensor_mib * 2**20 // 4)

    @sd.on_main_only(broadcast=True, name="memory copy")
    def copied() -> torch.Tensor:
        return big

    @sd.on_main_only(broadcast=True, share=True, name="memory share")
    def shared() -> torch.Tensor:
        return big

    def raw() -> torch.Tensor:
        out = big if rank == 0 else torch.empty_like(big)
        dist.broadcast(out, src=0)
        return out

    ways = {
        "dist.broadcast tensor, new buffer": raw,
        "on_main_only(broadcast) tensor": copied,
        "on_main_only(broadcast, share) tensor": shared,
    }
    found: dict[str, dict[str, float]] = {}
    for name, call in ways.items():
        dist.barrier()
        before, shm_before = _status(), _shmem()
        out = call()
        out.sum()  # every page read: mapped pages count once touched
        dist.barrier()
        after, shm_after = _status(), _shmem()
        grown = {k: after[k] - before[k] for k in before}
        every: list[dict[str, float]] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(every, grown)
        found[name] = {
            "private": sum(g["RssAnon"] for g in every),
            "shared": max(g["RssShmem"] for g in every),
            "machine_shmem": shm_after - shm_before,
            "copy": float(tensor_mib),
        }
        del out
        dist.barrier()
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--big-iters", type=int, default=3)
    parser.add_argument("--tensor-mib", type=int, default=64)
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()

    try:
        from accelerate import PartialState

        # Accelerate must create the group itself to see a multi-CPU job.
        PartialState(cpu=True, backend="gloo")
    except ImportError:
        dist.init_process_group("gloo")
    sd.init(timeout=600)
    rank = dist.get_rank()
    todo = [
        c
        for c in cases(rank, args.iters, args.big_iters, args.tensor_mib)
        if args.only is None or c[0] in args.only
    ]
    samples: dict[str, list[float]] = {name: [] for name, _, _ in todo}
    for _, call, _ in todo:  # warm up every path once
        call()
    for _ in range(args.rounds):
        for name, call, n in todo:
            dist.barrier()
            start = time.perf_counter()
            for _ in range(n):
                call()
            samples[name].append((time.perf_counter() - start) / n * 1e6)
    mem = memory(rank, args.tensor_mib) if args.only is None else {}
    if rank == 0:
        medians = {name: statistics.median(v) for name, v in samples.items()}
        with open(args.out, "w") as f:
            out = {"world_size": dist.get_world_size(), "us": medians, "mib": mem}
            json.dump({**out, "rounds": samples}, f)
    with contextlib.suppress(Exception):
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
