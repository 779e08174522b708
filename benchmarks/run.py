"""syncdeco against its peers, measured in one run.

    python benchmarks/run.py            # 2, 4 and 8 Gloo ranks, 16 for barriers
    python benchmarks/run.py --smoke    # one tiny iteration, to check it runs

For each world size it starts the ranks with torchrun on this machine, runs
every case and its peer in interleaved rounds (benchmarks/_worker.py), and
prints per-call medians and each ratio next to its target.  The decorator
cost on the Null backend is measured in this process, with the backend
chosen explicitly and on the default path (none chosen), in interleaved
rounds, as ranges and ratios to a wrapt pass-through of the same round:

    python benchmarks/run.py --null-only   # only that (a minute)

Peers: raw torch.distributed always; Accelerate's ``main_process_first``
and Lightning's ``rank_zero_only`` when installed (``pip install -e
".[bench]"``).

A tensor result is measured three ways: each rank its own copy
(``on_main_only(broadcast=True)``), every rank of the node the same shared
memory (``share=True``; also with every rank then reading all of it), and
the memory the node holds for it with every rank holding its result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Final

import torch
import wrapt

import syncdeco as sd

HERE = Path(__file__).resolve().parent

# (figure, syncdeco case, peer case, how to compare, target[, from how many ranks])
#   "time": syncdeco time / peer time, at most the target
#   "speed": peer time / syncdeco time (throughput ratio), at least the target
# A shared result saves the copies of a node's other ranks: its targets are
# for 4 ranks and more (at 2 there is one other copy to save).
FIGURES: list[tuple[str, str, str, str, float] | tuple[str, str, str, str, float, int]] = [
    ("barrier_after", "barrier_after", "dist.barrier", "time", 1.0),
    ("sd.barrier", "sd.barrier", "dist.barrier", "time", 1.0),
    ("main_first", "main_first", "accelerate main_process_first", "time", 1.0),
    (
        "broadcast, small result",
        "on_main_only(broadcast) small",
        "broadcast_object_list small",
        "time",
        0.5,
    ),
    (
        "broadcast, tensor result",
        "on_main_only(broadcast) tensor",
        "dist.broadcast tensor",
        "speed",
        0.8,
    ),
    (
        "broadcast, tensor result",
        "on_main_only(broadcast) tensor",
        "dist.broadcast tensor, new buffer",
        "speed",
        0.8,
    ),
    (
        "broadcast, tensor result",
        "on_main_only(broadcast) tensor",
        "broadcast_object_list tensor",
        "speed",
        5.0,
    ),
    (
        "shared tensor result",
        "on_main_only(broadcast, share) tensor",
        "dist.broadcast tensor, new buffer",
        "speed",
        3.0,
        4,
    ),
    (
        "shared tensor result, every rank reads it",
        "on_main_only(broadcast, share) tensor, read",
        "dist.broadcast tensor, new buffer",
        "speed",
        1.0,
        4,
    ),
]


Memory = dict[str, dict[str, float]]
Rounds = dict[str, list[float]]  # each case's per-call time in each round, µs


def run_ranks(
    n: int, args: argparse.Namespace, only: list[str] | None = None
) -> tuple[dict[str, float], Memory, Rounds]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(n), str(HERE / "_worker.py"), "--out", str(out),
            "--rounds", str(args.rounds), "--iters", str(args.iters),
            "--big-iters", str(args.big_iters), "--tensor-mib", str(args.tensor_mib),
        ]  # fmt: skip
        if only:
            cmd += ["--only", *only]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, env=env, timeout=1800, stdout=subprocess.DEVNULL)
        result = json.loads(out.read_text())
        return result["us"], result["mib"], result["rounds"]


def ratio(us: dict[str, float], mine: str, peer: str, how: str) -> float | None:
    if mine not in us or peer not in us:
        return None
    return us[mine] / us[peer] if how == "time" else us[peer] / us[mine]


def spread(rounds: Rounds, mine: str, peer: str, how: str) -> str:
    """The ratio's range over the rounds (each round times every case once,
    interleaved): ``[min-max]``."""
    if mine not in rounds or peer not in rounds:
        return ""
    pairs = zip(rounds[mine], rounds[peer], strict=True)
    values = [m / p if how == "time" else p / m for m, p in pairs]
    return f" [{min(values):.2f}-{max(values):.2f}]"


def verdict(value: float | None, how: str, target: float) -> str:
    if value is None:
        return "peer not installed"
    met = value <= target if how == "time" else value >= target
    sign = "<=" if how == "time" else ">="
    return f"{'met' if met else 'NOT met'} ({sign} {target:g}x)"


def print_memory(memory: dict[int, Memory], tensor_mib: int) -> None:
    """Memory the node holds for one tensor result, per way of handing it on."""
    print(
        f"\n# memory on the node for one {tensor_mib} MiB tensor result, every rank holding "
        f"it after reading all of it: the ranks' private (RssAnon) growth summed, plus the "
        f"shared pages they map (RssShmem growth, counted once: the ranks map the same "
        f"pages); Shmem: the machine's growth, a check (other processes move it too). "
        f"Growth beyond the tensor the main rank's function returned, which it holds "
        f"before the call (with share=True its result is the shared copy instead, so "
        f"once it drops its own the node holds one copy)\n"
    )
    print("| ranks | how | private MiB | shared MiB | node MiB | copies | target | Shmem MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for n, ways in memory.items():
        for how, m in ways.items():
            node = m["private"] + m["shared"]
            copies = node / m["copy"]
            target = ""
            if "share" in how:
                target = "met (about 1)" if copies <= 1.25 else "NOT met (about 1)"
            print(f"| {n} | {how} | {m['private']:.0f} | {m['shared']:.0f} | {node:.0f} "
                  f"| {copies:.2f} | {target} | {m['machine_shmem']:.0f} |")  # fmt: skip


FLOOR: Final = ("store floor", "store floor + cleanup", "store floor, queues")
SMALL: Final = ("barrier_after", "on_main_only(broadcast) small", "broadcast_object_list small")


def print_floor(runs: dict[int, tuple[dict[str, float], Rounds]]) -> None:
    """What the job's store allows: a sync point's store requests alone
    (see benchmarks/_worker.py), against a sync point, a small broadcast
    result and broadcast_object_list of the same run."""
    print(
        "\n# the store's floor: a sync point's requests alone (members set, rank 0 "
        "multi_gets and sets, members get), without and with syncdeco's cleanup "
        "(deleting the previous keys), and over the store's queues (a read takes the "
        "value: nothing to clean up; not syncdeco's design, see benchmarks/_worker.py); "
        "per-call medians in microseconds; ratios: of the medians, [their range over "
        "the rounds]\n"
    )
    print(
        "| ranks | store floor | + cleanup | queues | barrier_after | small broadcast "
        "| broadcast_object_list small | floor / bol | floor + cleanup / bol | queues / bol |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, (us, rounds) in runs.items():
        if not all(k in us for k in FLOOR + SMALL):
            continue
        bare, clean, queues = (us[k] for k in FLOOR)
        mine, small, bol = (us[k] for k in SMALL)
        low, high, q = (spread(rounds, k, SMALL[2], "time") for k in FLOOR)
        print(f"| {n} | {bare:.0f} | {clean:.0f} | {queues:.0f} | {mine:.0f} | {small:.0f} "
              f"| {bol:.0f} | {bare / bol:.2f}x{low} | {clean / bol:.2f}x{high} "
              f"| {queues / bol:.2f}x{q} |")  # fmt: skip


# (case, how the backend is chosen): "explicit" under sd.use_backend(NullBackend()),
# "default" with nothing chosen (what a plain `python script.py` takes: the
# backend is resolved at each call and comes out as the Null backend).
NullCase = tuple[str, str]


def null_overhead(repeats: int, number: int) -> dict[NullCase, list[float]]:
    """Per-call cost on the Null backend, in nanoseconds of this process's
    CPU time (steadier than wall time on a shared machine): one sample per
    round for each case, the cases interleaved within each round."""

    def f(x: int) -> int:
        return x

    bare = wrapt.FunctionWrapper(
        f, lambda wrapped, instance, args, kwargs: wrapped(*args, **kwargs)
    )
    stack = sd.barrier_after(sd.main_first(sd.on_main_only(broadcast=True)(f)))
    every = sd.barrier_after(every=10**9)(f)
    omo = sd.on_main_only(f)
    calls: dict[NullCase, Callable[[], object]] = {
        ("plain function", "-"): lambda: f(1),
        ("wrapt pass-through", "-"): lambda: bare(1),
        ("3-deep syncdeco stack", "explicit"): lambda: stack(1),
        ("3-deep syncdeco stack", "default"): lambda: stack(1),
        ("barrier_after(every=N), no sync", "explicit"): lambda: every(1),
        ("barrier_after(every=N), no sync", "default"): lambda: every(1),
        ("on_main_only, no broadcast", "explicit"): lambda: omo(1),
        ("on_main_only, no broadcast", "default"): lambda: omo(1),
    }
    try:
        from lightning_utilities.core.rank_zero import rank_zero_only

        rank_zero_only.rank = 0
        rzo = rank_zero_only(f)
        calls[("lightning rank_zero_only", "-")] = lambda: rzo(1)
    except ImportError:
        pass
    if sd.get_backend().__class__ is not sd.NullBackend:
        raise SystemExit("the default-path figures need a plain process (no launcher variables)")
    samples: dict[NullCase, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for case, call in calls.items():
            scope = sd.use_backend(sd.NullBackend()) if case[1] == "explicit" else nullcontext()
            with scope:
                call()  # warm
                samples[case].append(
                    timeit.timeit(call, timer=time.process_time, number=number) / number * 1e9
                )
    return samples


def print_null_overhead(samples: dict[NullCase, list[float]]) -> None:
    """Medians and ranges over the rounds; each ratio is taken per round
    against the wrapt pass-through of the same round."""
    base = samples[("wrapt pass-through", "-")]
    print(
        f"\n# Null backend, per call, CPU time: {len(base)} interleaved rounds; median "
        f"[min-max] over "
        f"the rounds; ratio per round to the wrapt pass-through of that round. Backend: "
        f"explicit = under sd.use_backend(NullBackend()), default = none chosen (a plain "
        f"`python script.py`)\n"
    )
    print("| Null backend, per call | backend | ns | ratio to wrapt pass-through | target |")
    print("|---|---|---|---|---|")
    for (name, path), values in samples.items():
        ratios = [v / b for v, b in zip(values, base, strict=True)]
        target = ""
        if "syncdeco" in name or "every" in name:
            target = verdict(statistics.median(ratios), "time", 1.3)
        ns = f"{statistics.median(values):.0f} [{min(values):.0f}-{max(values):.0f}]"
        ratio_text = f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]"
        print(f"| {name} | {path} | {ns} | {ratio_text} | {target} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="*", default=[2, 4, 8])
    parser.add_argument(
        "--scale", type=int, default=16, help="world size for the barrier-only scale run (0: skip)"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--big-iters", type=int, default=3)
    parser.add_argument("--tensor-mib", type=int, default=64)
    parser.add_argument("--smoke", action="store_true", help="one tiny iteration of everything")
    parser.add_argument(
        "--null-only", action="store_true", help="only the Null backend's per-call cost"
    )
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.scale, args.rounds, args.iters = [2], 0, 1, 2
        args.big_iters, args.tensor_mib = 1, 1

    python = f"{platform.python_implementation()} {platform.python_version()}"
    print(
        f"# syncdeco benchmark: torch {torch.__version__}, Gloo on loopback, "
        f"{os.cpu_count()} cores, {python}"
    )
    rounds, number = (3, 2000) if args.smoke else (15, 100_000)
    if args.null_only:
        print_null_overhead(null_overhead(repeats=rounds, number=number))
        return
    print(
        f"# {args.rounds} interleaved rounds of {args.iters} calls ({args.big_iters} for "
        f"{args.tensor_mib} MiB tensors); per-call medians in microseconds; ratio: of "
        f"the medians, [its range over the rounds]\n"
    )
    print("| ranks | figure | syncdeco | peer | syncdeco µs | peer µs | ratio | target |")
    print("|---|---|---|---|---|---|---|---|")
    runs: list[tuple[int, list[str] | None]] = [(n, None) for n in args.sizes]
    memory: dict[int, Memory] = {}
    if args.scale:
        runs.append((args.scale, ["dist.barrier", "barrier_after", "sd.barrier"]))
    floors: dict[int, tuple[dict[str, float], Rounds]] = {}
    for n, only in runs:
        us, memory[n], per_round = run_ranks(n, args, only)
        floors[n] = us, per_round
        for figure, mine, peer, how, target, *least in FIGURES:
            if mine not in us:
                continue
            value = ratio(us, mine, peer, how)
            peer_us = f"{us[peer]:.0f}" if peer in us else "-"
            shown = "-" if value is None else f"{value:.2f}x{spread(per_round, mine, peer, how)}"
            said = verdict(value, how, target)
            if least and n < least[0]:
                said = f"(a target from {least[0]} ranks)"
            print(f"| {n} | {figure} | {mine} | {peer} | {us[mine]:.0f} | {peer_us} | {shown} "
                  f"| {said} |")  # fmt: skip

    print_floor(floors)

    print_memory(memory, args.tensor_mib)

    print_null_overhead(null_overhead(repeats=rounds, number=number))


if __name__ == "__main__":
    main()
