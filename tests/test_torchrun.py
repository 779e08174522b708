"""syncdeco under the real torchrun launcher: two agents on loopback
(--nnodes 2, two processes each), as two nodes of one job."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import docs_output
import pytest
from scripted import read_until, start_script

from syncdeco._loopback import LOOPBACK

SCRIPT = Path(__file__).parent / "scripts" / "two_nodes.py"
KILLED = Path(__file__).parent / "scripts" / "killed.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_local_main_first_on_two_torchrun_nodes(tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [
        subprocess.Popen(
            [
                sys.executable, "-m", "torch.distributed.run",
                "--nnodes", "2", "--nproc-per-node", "2", "--node-rank", str(node),
                "--master-addr", "127.0.0.1", "--master-port", str(port),
                str(SCRIPT), str(tmp_path),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so a hang can be killed with its workers
        )
        for node in (0, 1)
    ]  # fmt: skip
    logs = []
    try:
        for agent in agents:
            out, _ = agent.communicate(timeout=120)
            logs.append(out.decode(errors="replace"))
    except subprocess.TimeoutExpired:
        pytest.fail("torchrun agents did not finish within 120s")
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
    assert [a.returncode for a in agents] == [0, 0], "\n".join(logs)
    facts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert [(f["rank"], f["node"], f["local_rank"]) for f in facts] == [
        (0, "0", 0),
        (1, "0", 1),
        (2, "1", 0),
        (3, "1", 1),
    ]
    assert [f["is_local_main"] for f in facts] == [True, False, True, False]
    assert [f["is_main"] for f in facts] == [True, False, False, False]
    # each node's LOCAL_RANK 0 went first; the others found its cache
    assert [f["saw_cache"] for f in facts] == [False, True, False, True]
    # No rank listens on every interface.  syncdeco's own ports (each node's
    # store, hosted by its main) are on loopback; every other port is a
    # process group's, where a group plain torch makes listens too.
    for f in facts:
        ours = {(LOOPBACK, port) for port in f["syncdeco_ports"]}
        before = {tuple(x) for x in f["listening"]}
        after = {tuple(x) for x in f["listening_with_a_torch_group"]}
        assert not [x for x in after if ipaddress.ip_address(x[0]).is_unspecified], facts
        assert len(ours) == (1 if f["is_local_main"] else 0) and ours <= before, facts
        torch_own = after - before  # plain torch's group
        assert torch_own and before <= after, facts
        assert {a for a, _ in before - ours} <= {a for a, _ in torch_own}, facts
        assert len(before - ours) == len(torch_own), facts  # one group each


def test_a_killed_rank_is_named_within_5s_under_a_slow_monitor(tmp_path: Path) -> None:
    # torchrun looks at its workers once a minute here, so it does not tear
    # the job down in time: the survivors, waiting with timeout=None, must
    # hear of the kill from syncdeco.
    agent = start_script([
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3",
        "--monitor-interval", "60", "--master-port", str(_free_port()),
        str(KILLED), str(tmp_path),
    ])  # fmt: skip
    # The agent itself notices its workers ended only at its next look (a
    # minute): stop reading once both survivors have spoken.
    said = ("[rank 0] RankKilledError", "[rank 2] RankKilledError")
    lines = read_until([agent], lambda lines: sum(ln.startswith(said) for ln in lines) >= 2, 120)
    log = "".join(lines)
    for rank in (0, 2):
        (line,) = [ln for ln in log.splitlines() if ln.startswith(f"[rank {rank}] RankKilledError")]
        took = float(line.split()[3].removesuffix("s"))
        assert took < 5, log
        assert ": rank 1 exited without reaching this sync point" in line, log
        assert "its process ended without running Python's exit handlers" in line, log
    docs_output.check("tests/scripts/killed.py", log)  # docs/errors.md shows it
