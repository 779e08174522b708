"""The steady load of node-loss detection on the job's store, simulated.

    python benchmarks/leases.py                 # 4096 ranks: 512 nodes of 8 (about a minute)
    python benchmarks/leases.py --nodes 64 --window 5
    python benchmarks/leases.py --without-listeners   # as before the loss mark

What syncdeco adds to the job's store while nothing happens (all ranks
training between sync points, or all waiting): every node's pulse renews
its lease (``syncdeco._plane.pulse``: a ``set`` every ``lease.PERIOD``
seconds), each pulse waits for the job's loss mark on a connection of its
own (``pulse.listen``, the product's function: a store ``wait``), and two
watchers (``syncdeco._plane.nodewatch.NodeWatch``, the product's class,
each with its own connection and thread) read every lease once a
``lease.LOOK``.  Here each pulse is a thread with a TCPStore
connection of its own that renews as the pulse does (the same key and
value, ``lease.alive``), against one real TCPStore server (libuv) in a
process of its own, so that its CPU time can be read.

It reports, over a window: the requests a second to the store (counted at
the clients), per node, and the store server's CPU, in the same run as a
window of the same server idle; then it writes the loss mark
(``pulse.mark``) and reports how long every pulse took to hear it (each
says so with a key of its own, as the product's pulse does).
``--without-listeners``: no pulse waits for the mark (as before it
existed), to compare the steady load.  On 2 cores the figures that transfer to a
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
    port: int, node: int, stop: threading.Event, counted: list[Counted], listen: bool
) -> None:
    import torch.distributed as dist

    from syncdeco._plane import lease, pulse
    from syncdeco._plane.pulse import LIST, lease_key

    tcp = dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False, timeout=CONNECT)
    store = Counted(dist.PrefixStore(NAMESPACE, tcp))
    if listen:  # as the pulse does: a connection of its own, waiting for the mark
        marks = Counted(dist.PrefixStore(NAMESPACE, tcp.clone()))
        threading.Thread(
            target=pulse.listen, args=(marks, f"n{node}", lambda loss: None), daemon=True
        ).start()
        counted.append(marks)
    counted.append(store)
    name, ranks = f"n{node}", range(8 * node, 8 * node + 8)
    store.set(lease_key(name), lease.alive(0, name, ranks))
    store.append(LIST, f"{name} {8 * node}\n")
    count = 0
    while not stop.wait(lease.PERIOD):
        count += 1
        store.set(lease_key(name), lease.alive(count, name, ranks))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=512, help="simulated nodes (8 ranks each)")
    parser.add_argument("--window", type=float, default=20.0, help="seconds measured")
    parser.add_argument("--without-listeners", action="store_true", help="no wait for the mark")
    args = parser.parse_args(argv)
    listen = not args.without_listeners
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
            threading.Thread(target=_pulse, args=(port, n, stop, counted, listen), daemon=True)
            for n in range(args.nodes)
        ]
        for t in threads:
            t.start()
        while len(counted) < args.nodes * (2 if listen else 1):
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
        heard = None
        if listen:  # a loss: the mark, and every pulse hearing it
            from syncdeco._plane import pulse

            store = watches[0]._store
            marked = time.monotonic()
            pulse.mark(store, b'{"how": "fail-fast"}')
            keys = [pulse.heard_key(f"n{n}") for n in range(args.nodes)]
            while not store.check(keys) and time.monotonic() < marked + 60:
                time.sleep(0.005)
            heard = time.monotonic() - marked
        stop.set()
        for w in watches:
            w.close()
    finally:
        here.send("stop")
        server.join(10)
    per_s = requests / took
    how = "with" if listen else "without"
    print(f"{args.nodes} nodes ({8 * args.nodes} ranks), {took:.0f} s window, {how} listeners")
    print(f"  requests to the job's store: {per_s:.0f}/s, {per_s / args.nodes:.2f} per node and s")
    print(f"    of which the two watchers: {watched / took:.1f}/s")
    print(
        f"  store server CPU: {100 * busy / took:.1f}% of a core "
        f"(idle, same server, same window: {100 * idle / args.window:.1f}%)"
    )
    print(f"  nodes judged lost (must be none): {len(failures)}")
    if heard is not None:
        print(f"  the loss mark: every pulse heard it {1000 * heard:.0f} ms after it was written")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
