"""The steady load of node-loss detection on the job's store, simulated.

    python benchmarks/leases.py                 # 4096 ranks: 512 nodes of 8 (about a minute)
    python benchmarks/leases.py --nodes 64 --window 5

What syncdeco adds to the job's store while nothing happens (all ranks
training between sync points, or all waiting): every node's pulse renews
its lease (``syncdeco._plane.pulse``: one request every ``lease.PERIOD``
seconds, ``pulse.renew``, a ``compare_set`` whose answer also carries a
loss mark, so that every node hears of a loss at no extra request; with
``--set``, a plain ``set`` as before marks existed, to compare), and two
watchers (``syncdeco._plane.nodewatch.NodeWatch``, the product's class,
each with its own connection and thread) read every lease once a
``lease.LOOK``.  Here each pulse is a thread with a TCPStore connection of
its own that renews as the pulse does (the same key, value and call),
against one real TCPStore server (libuv) in a process of its own, so that
its CPU time can be read.

It reports, over a window: the requests a second to the store (counted at
the clients), per node, and the store server's CPU, in the same run as a
window of the same server idle.  On 2 cores the figures that transfer to a
cluster are the server's CPU and the requests per node and second; the
absolute times do not.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import Counted, _raise_nofile, _serve, _server_cpu

CONNECT = timedelta(seconds=120)
NAMESPACE = "syncdeco-job/bench/"


def _pulse(
    port: int, node: int, stop: threading.Event, counted: list[Counted], plain: bool
) -> None:
    import torch.distributed as dist

    from syncdeco._plane import lease
    from syncdeco._plane.pulse import LIST, lease_key, renew

    tcp = dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False, timeout=CONNECT)
    store = Counted(dist.PrefixStore(NAMESPACE, tcp))
    counted.append(store)
    name, ranks = f"n{node}", range(8 * node, 8 * node + 8)
    wrote = lease.alive(0, name, ranks)
    store.set(lease_key(name), wrote)
    store.append(LIST, f"{name} {8 * node}\n")
    count = 0
    while not stop.wait(lease.PERIOD):
        count += 1
        if plain:
            store.set(lease_key(name), lease.alive(count, name, ranks))
        else:
            wrote, _ = renew(store, lease_key(name), wrote, lease.alive(count, name, ranks))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=512, help="simulated nodes (8 ranks each)")
    parser.add_argument("--window", type=float, default=20.0, help="seconds measured")
    parser.add_argument("--set", action="store_true", help="renew with a plain set (before)")
    args = parser.parse_args(argv)
    _raise_nofile()
    import torch.distributed as dist

    from syncdeco._plane import lease
    from syncdeco._plane.nodewatch import NodeWatch

    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(there,), daemon=True)
    server.start()
    port = int(here.recv())
    try:
        # The idle server first, over the same window: the baseline.
        before = _server_cpu(server.pid)  # type: ignore[arg-type]
        time.sleep(args.window)
        idle = _server_cpu(server.pid) - before  # type: ignore[arg-type]

        stop = threading.Event()
        counted: list[Counted] = []
        threads = [
            threading.Thread(target=_pulse, args=(port, n, stop, counted, args.set), daemon=True)
            for n in range(args.nodes)
        ]
        for t in threads:
            t.start()
        while len(counted) < args.nodes:
            time.sleep(0.1)
        failures: list[Any] = []
        watches = [
            NodeWatch(
                dist.PrefixStore(  # type: ignore[attr-defined]
                    NAMESPACE,
                    dist.TCPStore(
                        "127.0.0.1", port, is_master=False, wait_for_workers=False, timeout=CONNECT
                    ),
                ),
                f"n{n}",
                8 * n,
                failures.extend,
            )
            for n in (0, 1)
        ]
        for w in watches:
            w._store = Counted(w._store)  # count what the product's watcher sends
            counted.append(w._store)
            w.start()
        time.sleep(3 * lease.LOOK + lease.PERIOD)  # every pulse listed, the looks in step
        for c in counted:
            c.reset()
        before = _server_cpu(server.pid)  # type: ignore[arg-type]
        start = time.monotonic()
        time.sleep(args.window)
        took = time.monotonic() - start
        busy = _server_cpu(server.pid) - before  # type: ignore[arg-type]
        requests = sum(c.requests for c in counted)
        watched = sum(c.requests for c in counted[-2:])
        stop.set()
        for w in watches:
            w.close()
    finally:
        here.send("stop")
        server.join(10)
    per_s = requests / took
    how = "set" if args.set else "compare_set"
    print(f"{args.nodes} nodes ({8 * args.nodes} ranks), {took:.0f} s window, renewals by {how}")
    print(f"  requests to the job's store: {per_s:.0f}/s, {per_s / args.nodes:.2f} per node and s")
    print(f"    of which the two watchers: {watched / took:.1f}/s")
    print(
        f"  store server CPU: {100 * busy / took:.1f}% of a core "
        f"(idle, same server, same window: {100 * idle / args.window:.1f}%)"
    )
    print(f"  nodes judged lost (must be none): {len(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
