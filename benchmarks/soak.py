"""Soak: run a two-node job many times and count the runs that end cleanly.

    python benchmarks/soak.py               # 100 runs
    python benchmarks/soak.py --runs 30     # fewer
    python benchmarks/soak.py --shm-mib 16  # /dev/shm of 16 MiB (needs root and unshare)

Each run starts two torchrun agents on loopback (``--nnodes 2``, two ranks
each; their GROUP_RANK puts the ranks on two nodes) running
``benchmarks/_soak_job.py``: every decorator, ``share=True`` (world and per
node) and an ``async def`` sync point.  A run is clean when every rank
exits 0 (torchrun's agent exits 0 only then, and says which rank did not),
every rank got the right results (checksums), nothing alarming is in any
output (``terminate called``, ``Aborted``, a traceback, an error or a c10d
warning line), and nothing of the job's ranks is left in ``/dev/shm``.
Prints each unclean run as it happens, then how many runs were clean, how
many exited cleanly (the others only logged: c10d's warning that a store
wait timed out, or torchrun's own exit-barrier error), and the kinds of
failure seen.  Not a timed test: a run takes 15 to 25 s on 2 loaded cores.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
JOB = HERE / "_soak_job.py"
SHM = "/dev/shm"
# What a run's output must not hold.  The first kinds break the promise
# (every rank exits 0 and cleanly); the "noise" kinds are log lines only.
_C10D_LINE = re.compile(r"^(\[rank\d+\]:)?\[?[WE]\d{4} ")
_NOISE = ("c10d wait-timeout warning in a rank", "c10d log line", "torchrun agent's own traceback")


def _alarms(text: str) -> list[tuple[str, str]]:
    """(kind, line) for each alarming line of one agent's output."""
    found = []
    for line in text.splitlines():
        if "terminate called" in line:
            found.append(("terminate called", line))
        elif re.search(r"Aborted|SIGABRT", line):
            found.append(("abort", line))
        elif "Traceback (most recent call last)" in line:
            agent = "torch/distributed/elastic" in line and not line.startswith("[rank")
            found.append(("torchrun agent's own traceback" if agent else "traceback", line))
        elif _C10D_LINE.match(line):
            rank = line.startswith("[rank")
            waited = "waitForInput" in line or "timed out after" in line
            found.append(
                (
                    "c10d wait-timeout warning in a rank" if rank and waited else "c10d log line",
                    line,
                )
            )
        elif "ChildFailedError" in line or re.search(r"\bexitcode\b", line):
            found.append(("torchrun failure", line))
        elif re.match(r"^(\[[^\]]*\]:?)?\s*\w*(Error|Exception)\b", line) and not line.startswith(
            "Exception raised from"  # the C++ stack under a c10d log line
        ):
            found.append(("error line", line))
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _agents(out: Path, mib: float, shm_mib: int | None) -> list[list[str]]:
    port = _free_port()
    commands = []
    for node in (0, 1):
        command = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "2", "--nproc-per-node", "2", "--node-rank", str(node),
            "--master-addr", "127.0.0.1", "--master-port", str(port),
            "--monitor-interval", "0.1",
            str(JOB), str(out), str(mib),
        ]  # fmt: skip
        if shm_mib is not None:
            # this agent's ranks see a /dev/shm of their own, shm_mib large
            command = [
                "unshare", "--mount", "--propagation", "private", "sh", "-c",
                f'mount -t tmpfs -o size={shm_mib}m tmpfs {SHM} && exec "$@"', "sh",
                *command,
            ]  # fmt: skip
        commands.append(command)
    return commands


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = collections.defaultdict(list)
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children[int(fields[1])].append(int(stat.split("/")[2]))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _dump_stacks(agents: list[subprocess.Popen[bytes]]) -> None:
    """Ask every rank of a hung run for its threads' stacks (the job
    registers faulthandler on SIGUSR1), into the agents' output."""
    for agent in agents:
        for pid in _descendants(agent.pid):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    command = f.read()
                if JOB.name.encode() not in command or b"torch.distributed.run" in command:
                    continue  # an agent (SIGUSR1 would end it), or a wrapper
                os.kill(pid, signal.SIGUSR1)
            except OSError:
                pass
    time.sleep(2)  # a moment for them to write (only on a hung run)


def one_run(mib: float, shm_mib: int | None, timeout: float) -> tuple[list[str], int]:
    """One two-node job; returns what was wrong with it (nothing: clean), and
    how many ranks said a result went through the store (no room in
    ``/dev/shm``)."""
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="syncdeco-soak-") as tmp:
        out = Path(tmp)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        agents = [
            subprocess.Popen(
                command,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # so a hang can be killed with its ranks
            )
            for command in _agents(out, mib, shm_mib)
        ]
        logs = [""] * len(agents)
        try:
            deadline = time.monotonic() + timeout
            for node, agent in enumerate(agents):
                text, _ = agent.communicate(timeout=max(1.0, deadline - time.monotonic()))
                logs[node] = text.decode(errors="replace")
        except subprocess.TimeoutExpired:
            problems.append(f"hang: not done within {timeout:g}s")
            _dump_stacks(agents)
        finally:
            for node, agent in enumerate(agents):
                if agent.poll() is None:
                    os.killpg(agent.pid, signal.SIGKILL)
                if not logs[node]:
                    text, _ = agent.communicate()
                    logs[node] = text.decode(errors="replace")
        for node, agent in enumerate(agents):
            if agent.returncode != 0:
                problems.append(f"exit status: node {node}'s agent exited {agent.returncode}")
        for node, text in enumerate(logs):
            seen = set()
            for kind, line in _alarms(text):
                if kind not in seen:  # the first line of each kind
                    seen.add(kind)
                    problems.append(f"{kind}: node {node}: {line.strip()[:160]}")
        pids = []
        for rank in range(4):
            try:
                facts = json.loads((out / f"rank{rank}.json").read_text())
            except (OSError, ValueError):
                problems.append(f"no result: rank {rank} wrote none")
                continue
            pids.append(facts["pid"])
            if facts["digests"] != [facts["want"]] * 3:
                problems.append(f"wrong result: rank {rank} {facts['digests']}")
        if shm_mib is None:  # else that /dev/shm went with the agents' namespaces
            left = [
                f
                for f in glob.glob(f"{SHM}/syncdeco-*")
                if any(re.search(rf"-{pid}-", os.path.basename(f)) for pid in pids)
            ]
            if left:
                problems.append(f"left in {SHM}: {left}")
        if problems:
            problems.append(
                "output:\n" + "\n".join(f"--- node {n}\n{t}" for n, t in enumerate(logs))
            )
    return problems, sum(text.count(") does not fit in ") for text in logs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100, help="how many jobs (default 100)")
    parser.add_argument(
        "--mib", type=float, default=4.0, help="size of each share=True result (default 4 MiB)"
    )
    parser.add_argument(
        "--shm-mib",
        type=int,
        default=None,
        help="run each agent in a mount namespace whose /dev/shm holds this many MiB",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="per run (default 120 s)")
    parser.add_argument("--quiet", action="store_true", help="do not print unclean runs' output")
    args = parser.parse_args()
    if args.shm_mib is not None and shutil.which("unshare") is None:
        parser.error("--shm-mib needs unshare(1)")
    kinds: collections.Counter[str] = collections.Counter()
    clean = exits_clean = fallbacks = 0
    started = time.monotonic()
    for n in range(1, args.runs + 1):
        problems, fell_back = one_run(args.mib, args.shm_mib, args.timeout)
        fallbacks += fell_back
        if not problems:
            clean += 1
            exits_clean += 1
        else:
            found = {problem.split(":", 1)[0] for problem in problems[:-1]}
            kinds.update(found)
            if found <= set(_NOISE):
                exits_clean += 1
            print(f"run {n}: unclean", file=sys.stderr)
            for problem in problems if not args.quiet else problems[:-1]:
                print(f"  {problem}", file=sys.stderr)
        print(f"run {n}: {clean}/{n} clean ({time.monotonic() - started:.0f}s)", flush=True)
    print(f"{clean} of {args.runs} two-node runs were clean")
    left = (
        f"nothing left in {SHM}"
        if args.shm_mib is None
        else f"{SHM} not looked at: each node's went with its namespace"
    )
    print(
        f"{exits_clean} of {args.runs} exited cleanly (every rank 0; no abort, terminate or "
        f"traceback; right results; {left}); the others' log lines only: " + ", ".join(_NOISE)
    )
    if fallbacks:
        print(f"  ({fallbacks} warnings that a result did not fit in {SHM}: it went by the store)")
    for kind, count in kinds.most_common():
        print(f"  {kind}: {count}")
    sys.exit(0 if clean == args.runs else 1)


if __name__ == "__main__":
    main()
