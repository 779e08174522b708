"""Check syncdeco's CUDA path (NCCL, CUDA tensors in broadcast results) on this machine.

    python benchmarks/gpu_check.py

One command, for a machine with one CUDA GPU or more; it starts its own ranks
(subprocesses with torchrun's variables: RANK, WORLD_SIZE, LOCAL_RANK, ...,
and a free MASTER_PORT on 127.0.0.1), prints one PASS, FAIL or SKIP line per
check and the figures, and exits non-zero if any check FAILed.  It takes
well under 5 minutes (each run of ranks has a timeout, and all of them
together stop at 280 s).  Without a GPU every check is SKIPPED and it exits 0.

The checks, with what each covers in syncdeco/_plane/wire.py:

nccl-group
    World size 1 under torchrun's variables, with ``TorchBackend()`` (NCCL
    when CUDA is available): the first sync point creates the NCCL group
    (``ensure_group``), the result of ``@sd.on_main_only(broadcast=True)``
    comes back unchanged, and a barrier after it works.
local-rank-device
    ``torch.cuda.current_device()`` after syncdeco created the NCCL group is
    ``LOCAL_RANK % device_count()``, for LOCAL_RANK = device_count() (device
    0: a plain ``set_device(LOCAL_RANK)`` would fail there) and, with two GPUs
    or more, device_count() + 1 (device 1).
nccl-wire
    World size 1 over NCCL: each half of the wire path in one process:
    ``wire_device`` is this rank's CUDA device, ``on_wire`` puts CPU and
    CUDA tensors there, NCCL broadcasts them, and ``off_wire`` gives back
    the device, requires_grad and nn.Parameter the main rank had.
gloo-cuda-broadcast
    2 Gloo ranks sharing the GPU(s) (``sd.init("gloo")``; each rank's current
    device is LOCAL_RANK % device_count()): ``@sd.on_main_only(broadcast=True)``
    returns a dict of CUDA tensors (float32, bfloat16, int64, bool, 0-d, empty,
    non-contiguous, requires_grad, nn.Parameter trainable and frozen, one
    tensor under two keys) and a CPU tensor.  On the member every CUDA
    tensor comes back on its current CUDA device, the CPU one on the CPU,
    with dtype, shape and values equal and requires_grad / nn.Parameter
    kept.  syncdeco stages CUDA tensors through host memory on Gloo
    (``wire_device`` is the CPU for every backend but NCCL), so Gloo's own
    CUDA support is not needed; what can stop two processes sharing a GPU is
    an exclusive compute mode, reported as SKIP.
nccl-broadcast
    The same result over NCCL with 2 ranks (the group created at the first
    sync point, as under torchrun): on two GPUs when there are two; on one
    GPU it is tried too, and NCCL's refusal of two ranks on one device
    ("Duplicate GPU detected") is reported as SKIP with NCCL's words.

Figures: the time of ``@sd.on_main_only(broadcast=True)`` returning a 64 MiB
tensor (median of 5, after a barrier, on each rank), CUDA and CPU over Gloo
and CUDA over NCCL where it ran, and raw ``dist.broadcast`` of the same CUDA
tensor over Gloo as the peer, where Gloo takes CUDA tensors.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
CHECKOUT = HERE.parent.parent  # the syncdeco checked is the one beside this script
CHECKS = (
    "nccl-group",
    "local-rank-device",
    "nccl-wire",
    "gloo-cuda-broadcast",
    "nccl-broadcast",
)
BUDGET = 280.0  # seconds for all runs of ranks together
TAG = "@@gpu_check "  # a worker's report line on stdout
BIG = 64 << 20  # bytes in the timed tensor
REPEAT = 5


# -- the worker side: one rank ------------------------------------------------

# --rehearse (for this script's own test, on a machine without a GPU): the
# same ranks, reports and comparisons with CPU tensors standing in for CUDA
# ones and Gloo for NCCL.  It checks the script, nothing about CUDA.
REHEARSAL = os.environ.get("SYNCDECO_GPU_CHECK_REHEARSAL") == "1"
CUDA = "CUDA"
if REHEARSAL:
    BIG = 1 << 20
    CUDA = "CPU-for-CUDA"


def report(check: str, status: str, detail: str = "") -> None:
    line = {"check": check, "status": status, "detail": detail, "rank": _rank()}
    print(TAG + json.dumps(line), flush=True)


def figure(name: str, value: str) -> None:
    print(TAG + json.dumps({"figure": name, "value": value, "rank": _rank()}), flush=True)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class Check:
    """What a ``with checking(...)`` block noted, and whether it passed."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.passed = False


@contextmanager
def checking(check: str) -> Iterator[Check]:
    """Report ``check`` as PASS with what the block noted, or FAIL with the
    exception it raised."""
    result = Check()
    try:
        yield result
    except Exception as exc:
        import traceback

        where = traceback.extract_tb(exc.__traceback__)[-1]
        report(check, "FAIL", f"{type(exc).__name__}: {exc} (line {where.lineno})")
    else:
        result.passed = True
        report(check, "PASS", "; ".join(result.notes))


def here() -> Any:
    """This rank's current CUDA device (the CPU in a rehearsal)."""
    import torch

    if REHEARSAL:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def device_count() -> int:
    import torch

    return 1 if REHEARSAL else torch.cuda.device_count()


def synchronize() -> None:
    import torch

    if not REHEARSAL:
        torch.cuda.synchronize()


def expected_result(device: Any) -> dict[str, Any]:
    """What the main rank returns; every rank builds it to compare."""
    import torch

    shared = torch.arange(3.0, device=device)
    return {
        "f32": torch.arange(12, dtype=torch.float32, device=device).reshape(3, 4) * 0.5,
        "bf16": torch.arange(7, device=device).to(torch.bfloat16) / 3,
        "i64": torch.arange(-5, 5, device=device),
        "bool": torch.tensor([True, False, True], device=device),
        "scalar": torch.tensor(3.5, device=device),
        "empty": torch.empty(0, 3, device=device),
        "noncontig": torch.arange(6.0, device=device).reshape(2, 3).t(),
        "grad": torch.linspace(0, 1, 5, device=device).requires_grad_(),
        "param": torch.nn.Parameter(torch.ones(2, 3, device=device)),
        "frozen": torch.nn.Parameter(torch.zeros(4, device=device), requires_grad=False),
        "cpu": torch.arange(4.0),
        "shared_a": shared,
        "shared_b": shared,
        "label": "not a tensor",
    }


def compare(got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """Every way ``got`` differs from ``want``; the tensors of ``got`` belong
    on this rank's current CUDA device, those ``want`` has on the CPU on the CPU."""
    import torch

    problems = []
    for key, expected in want.items():
        value = got.get(key)
        if not isinstance(expected, torch.Tensor):
            if value != expected:
                problems.append(f"{key}: {value!r} != {expected!r}")
            continue
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key}: got {type(value).__name__}")
            continue
        device = torch.device("cpu") if expected.device.type == "cpu" else here()
        if value.device != device:
            problems.append(f"{key}: on {value.device}, not {device}")
        if type(value) is not type(expected):
            problems.append(f"{key}: a {type(value).__name__}, not {type(expected).__name__}")
        if value.dtype != expected.dtype or value.shape != expected.shape:
            problems.append(
                f"{key}: {value.dtype} {tuple(value.shape)}, "
                f"not {expected.dtype} {tuple(expected.shape)}"
            )
        elif not torch.equal(value.detach().cpu(), expected.detach().cpu()):
            problems.append(f"{key}: values differ")
        if value.requires_grad != expected.requires_grad:
            problems.append(f"{key}: requires_grad={value.requires_grad}")
    if {"shared_a", "shared_b"} <= want.keys() and got.get("shared_a") is not got.get("shared_b"):
        problems.append("one tensor under two keys came back as two tensors")
    return problems


def time_broadcast(label: str, make: Callable[[], Any], check: Callable[[Any], bool]) -> None:
    """Time ``make`` (a broadcasting function) REPEAT times after one warm-up."""
    import syncdeco as sd

    seconds = []
    for i in range(REPEAT + 1):
        sd.barrier(f"before {label} #{i}")
        synchronize()
        start = time.perf_counter()
        value = make()
        synchronize()
        if i:
            seconds.append(time.perf_counter() - start)
        if not check(value):
            raise AssertionError(f"{label}: the received values differ")
    figure(label, f"{statistics.median(seconds) * 1e3:.1f} ms median of {REPEAT}")


def nccl_version() -> str:
    import torch.cuda.nccl

    try:
        version = torch.cuda.nccl.version()  # type: ignore[no-untyped-call]
    except Exception as exc:
        return f"unknown ({exc})"
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def big_values(device: Any) -> Any:
    import torch

    return torch.arange(BIG // 4, dtype=torch.int32, device=device)


def worker_single(check_wire: bool) -> None:
    """World size 1 under torchrun's variables, the group created by syncdeco."""
    import torch
    import torch.distributed as dist

    import syncdeco as sd
    from syncdeco._plane import wire as internals

    backend = "gloo" if REHEARSAL else "nccl"
    local_rank = int(os.environ["LOCAL_RANK"])
    with checking("nccl-group") as outcome:
        assert not dist.is_initialized(), "a process group exists before the first sync point"

        @sd.on_main_only(broadcast=True)
        def make() -> dict[str, Any]:
            return expected_result(here())

        with sd.use_backend(sd.TorchBackend()):  # NCCL when CUDA is available
            got = make()  # the first sync point
            assert dist.is_initialized(), "the first sync point created no process group"
            assert dist.get_backend() == backend, f"backend {dist.get_backend()}, not {backend}"
            if problems := compare(got, expected_result(here())):
                raise AssertionError("; ".join(problems))
            sd.barrier("after the first sync point")
        version = "" if REHEARSAL else f", NCCL {nccl_version()}"
        outcome.notes.append(f"{backend} group created at the first sync point{version}")
    with checking("local-rank-device") as outcome:
        count = device_count()
        want = local_rank % count
        current = 0 if REHEARSAL else torch.cuda.current_device()
        assert current == want, (
            f"current device {current}, not LOCAL_RANK {local_rank} % {count} GPUs = {want}"
        )
        outcome.notes.append(f"LOCAL_RANK={local_rank}, {count} GPU(s): cuda:{current}")
    if check_wire and dist.is_initialized():
        with checking("nccl-wire") as outcome:
            device = here()
            wire_device = internals.wire_device()
            assert wire_device == device, f"wire device {wire_device}, not {device}"
            for key, tensor in expected_result(device).items():
                if not isinstance(tensor, torch.Tensor):
                    continue
                wire = internals.on_wire(tensor)
                assert wire.device == device, f"{key}: on the wire on {wire.device}"
                assert wire.is_contiguous(), f"{key}: not contiguous on the wire"
                dist.broadcast(wire, src=0)
                back = internals.off_wire(wire, internals.meta(tensor))
                if problems := compare({key: back}, {key: tensor}):
                    raise AssertionError("; ".join(problems))
                buffer = internals.receive_buffer(tuple(tensor.shape), tensor.dtype, device)
                assert buffer.device == device, f"{key}: receive buffer on {buffer.device}"
            outcome.notes.append(f"CPU and CUDA tensors: on_wire, {backend} broadcast, off_wire")
    if dist.is_initialized():
        dist.destroy_process_group()


def worker_pair(backend: str) -> None:
    """2 ranks; ``backend`` "gloo" (sd.init) or "nccl" (at the first sync point)."""
    import torch
    import torch.distributed as dist

    import syncdeco as sd

    check = "gloo-cuda-broadcast" if backend == "gloo" else "nccl-broadcast"
    if backend == "gloo":
        if not REHEARSAL:  # what a training script does
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % device_count())
        sd.init("gloo")

    @sd.on_main_only(broadcast=True)
    def make() -> dict[str, Any]:
        return expected_result(here())

    with checking(check) as outcome:
        got = make()  # under NCCL: the first sync point creates the group
        assert dist.get_backend() == backend, f"backend {dist.get_backend()}, not {backend}"
        if problems := compare(got, expected_result(here())):
            raise AssertionError("; ".join(problems))
        role = "main, its own result" if sd.is_main() else "member, received"
        outcome.notes.append(f"rank {sd.rank()} on {here()} ({role})")

    @sd.barrier_after
    def agree(passed: bool) -> None:
        if not passed:
            raise RuntimeError(f"{check} failed on this rank")

    try:
        agree(outcome.passed)  # over the store: it works when the broadcast did not
    except (RuntimeError, sd.SyncError):
        # Every rank knows now, so none waits for another: leave at once,
        # since a group whose broadcast failed (NCCL's communicator, say) may
        # hang in its teardown.
        sys.stdout.flush()
        os._exit(1)

    def device_big() -> Any:
        return big_values(here())

    def cpu_big() -> Any:
        return big_values("cpu")

    size = f"{BIG >> 20} MiB"
    want = device_big()
    time_broadcast(
        f"{backend}, 2 ranks: on_main_only(broadcast=True) -> {size} {CUDA} tensor",
        sd.on_main_only(broadcast=True)(device_big),
        lambda value: value.device == want.device and bool(torch.equal(value, want)),
    )
    if backend == "gloo":
        want_cpu = cpu_big()
        time_broadcast(
            f"gloo, 2 ranks: on_main_only(broadcast=True) -> {size} CPU tensor",
            sd.on_main_only(broadcast=True)(cpu_big),
            lambda value: bool(torch.equal(value, want_cpu)),
        )
        # The peer: raw dist.broadcast of the CUDA tensor, where Gloo takes one.
        buffer = want.clone() if sd.is_main() else torch.empty_like(want)
        label = f"gloo, 2 ranks: raw dist.broadcast, {size} {CUDA} tensor (peer)"
        try:
            dist.broadcast(buffer, src=0)
        except Exception as exc:  # both ranks refuse alike, before sending
            figure(label, f"n/a ({type(exc).__name__}: {str(exc)[:200]})")
        else:

            def raw() -> Any:
                dist.broadcast(buffer, src=0)
                return buffer

            time_broadcast(label, raw, lambda value: bool(torch.equal(value, want)))
    sd.barrier("done")
    dist.destroy_process_group()


# -- the driver side ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_ranks(
    mode: str, world_size: int, local_ranks: list[int], timeout: float
) -> list[tuple[int, str, str]]:
    """Run this file as ``--worker mode`` on ``world_size`` ranks; return each
    rank's (exit status, stdout, stderr), -9 for a rank killed at the timeout."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(local_ranks[rank]),
            "LOCAL_WORLD_SIZE": str(max(local_ranks) + 1),
            "GROUP_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(CHECKOUT), os.environ.get("PYTHONPATH")])
            ),
            # NCCL says why it refuses (e.g. two ranks on one GPU) on stdout
            "NCCL_DEBUG": os.environ.get("NCCL_DEBUG", "WARN"),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HERE), "--worker", mode],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,  # a timeout kills whatever a rank started
            )
        )
    deadline = time.monotonic() + timeout
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            results.append((proc.returncode, out, err))
        except subprocess.TimeoutExpired:
            for other in procs:
                if other.poll() is None:
                    os.killpg(other.pid, signal.SIGKILL)
            out, err = proc.communicate()
            results.append((-9, out, err))
    for proc in procs:  # the ranks not yet read, killed above if still running
        proc.wait()
    return results


class Driver:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.statuses: dict[str, str] = {}
        self.figures: dict[str, list[str]] = {}

    def left(self, wanted: float) -> float:
        return min(wanted, BUDGET - (time.monotonic() - self.started))

    def say(self, check: str, status: str, detail: str) -> None:
        self.statuses[check] = status
        print(f"{status:<4}  {check}: {detail}", flush=True)

    def run(
        self,
        mode: str,
        checks: tuple[str, ...],
        world_size: int,
        local_ranks: list[int],
        timeout: float,
        skip_if: Callable[[str], str | None] | None = None,
    ) -> None:
        """Start the ranks, then print one line per check from their reports:
        PASS when every rank passed it, SKIP when ``skip_if`` finds a reason in
        the ranks' output and none passed it, else FAIL."""
        budget = self.left(timeout)
        if budget < 10:
            for check in checks:
                self.say(check, "FAIL", f"not run: the {BUDGET:.0f} s budget is spent")
            return
        t0 = time.monotonic()
        results = start_ranks(mode, world_size, local_ranks, budget)
        took = time.monotonic() - t0
        reports: dict[str, list[tuple[int, str, str]]] = {check: [] for check in checks}
        for _, out, _ in results:
            for line in out.splitlines():
                if not line.startswith(TAG):
                    continue
                item = json.loads(line[len(TAG) :])
                if "figure" in item:
                    self.figures.setdefault(item["figure"], []).append(
                        f"rank {item['rank']}: {item['value']}"
                    )
                elif item["check"] in reports:
                    reports[item["check"]].append((item["rank"], item["status"], item["detail"]))
        skip = skip_if("\n".join(out + err for _, out, err in results)) if skip_if else None
        for check in checks:
            got = reports[check]
            details = "; ".join(f"rank {rank}: {detail}" for rank, _, detail in got)
            if skip is not None and not any(status == "PASS" for _, status, _ in got):
                self.say(check, "SKIP", skip)
            elif len(got) == world_size and all(status == "PASS" for _, status, _ in got):
                self.say(check, "PASS", f"{details} ({took:.1f} s)")
            else:
                silent = [r for r in range(world_size) if r not in {rank for rank, _, _ in got}]
                why = "; ".join(filter(None, [details, self.explain(results, silent, budget)]))
                self.say(check, "FAIL", why)
        if any(code == -9 for code, _, _ in results):
            self.figures.setdefault(mode, []).append(f"killed at the {budget:.0f} s timeout")

    @staticmethod
    def explain(results: list[tuple[int, str, str]], ranks: list[int], timeout: float) -> str:
        """Why ``ranks`` sent no report."""
        parts = []
        for rank in ranks:
            code, _, err = results[rank]
            if code == -9:
                parts.append(f"rank {rank} still running after {timeout:.0f} s: killed")
            else:
                tail = " | ".join(line for line in err.strip().splitlines()[-3:])
                parts.append(f"rank {rank}, exit status {code}, no report: {tail}")
        return "; ".join(parts)


def exclusive_compute_mode() -> str | None:
    """The GPU's compute mode when it lets one process at a time use it."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_mode", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    modes = {line.strip() for line in out.splitlines() if line.strip()}
    return next((m for m in modes if m.lower() != "default"), None)


def busy_gpu(output: str) -> str | None:
    if "busy or unavailable" in output or "all CUDA-capable devices are busy" in output:
        return "the GPU takes one process at a time (exclusive compute mode)"
    return None


def duplicate_gpu(output: str) -> str | None:
    where = output.find("Duplicate GPU detected")
    if where >= 0:
        said = output[where:].splitlines()[0][:160].rstrip('\\"}')
        return f"NCCL refuses two ranks on one GPU ({said}); it needs 2 GPUs"
    return busy_gpu(output)


def main(argv: list[str]) -> int:
    rehearse = "--rehearse" in argv
    print(__doc__.split("\n\n")[0].strip() + "\n", flush=True)
    sys.path.insert(0, str(CHECKOUT))
    import torch
    import torch.distributed as dist

    import syncdeco

    print(f"syncdeco {syncdeco.__version__} from {Path(syncdeco.__file__).parent}\n")

    driver = Driver()
    if rehearse:
        # The ranks stand CPU tensors in for CUDA ones and Gloo for NCCL.
        os.environ["SYNCDECO_GPU_CHECK_REHEARSAL"] = "1"
        count, nccl, exclusive = 1, True, None
        print("REHEARSAL on the CPU: this checks the script, nothing about CUDA or NCCL\n")
    elif not torch.cuda.is_available():
        build = f"torch {torch.__version__}, CUDA {torch.version.cuda}"
        for check in CHECKS:
            driver.say(check, "SKIP", f"no GPU (torch.cuda.is_available() is False; {build})")
        print("\nevery check SKIPPED (no GPU)")
        return 0
    else:
        count = torch.cuda.device_count()
        names = ", ".join(sorted({torch.cuda.get_device_name(i) for i in range(count)}))
        nccl = dist.is_nccl_available()
        exclusive = exclusive_compute_mode()
        print(
            f"{count} GPU(s): {names}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"NCCL {nccl_version() if nccl else 'none'}"
            f"{f', compute mode {exclusive}' if exclusive else ''}\n",
            flush=True,
        )
    if nccl:
        driver.run("single", CHECKS[:3], 1, [count], timeout=90)
        if count >= 2:  # LOCAL_RANK = count + 1 lands on device 1
            driver.run("single-device-only", ("local-rank-device",), 1, [count + 1], timeout=90)
    else:
        for check in CHECKS[:3]:
            driver.say(check, "SKIP", "this torch has no NCCL")
    one_process = f"compute mode {exclusive}: one process per GPU, and {count} GPU"
    if exclusive and count < 2:
        driver.say(CHECKS[3], "SKIP", one_process)
    else:
        driver.run("gloo", CHECKS[3:4], 2, [0, 1], timeout=120, skip_if=busy_gpu)
    if rehearse:
        driver.say(CHECKS[4], "SKIP", "rehearsal: no NCCL")
    elif not nccl:
        driver.say(CHECKS[4], "SKIP", "this torch has no NCCL")
    elif exclusive and count < 2:
        driver.say(CHECKS[4], "SKIP", one_process)
    else:
        driver.run("nccl", CHECKS[4:], 2, [0, 1], timeout=90, skip_if=duplicate_gpu)
    if driver.figures:
        print("\nfigures:")
        for name, values in driver.figures.items():
            print(f"  {name}: {', '.join(sorted(values))}")
    failed = sorted(c for c, s in driver.statuses.items() if s == "FAIL")
    took = time.monotonic() - driver.started
    print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'no check failed'} ({took:.0f} s)")
    return 1 if failed else 0


def worker(mode: str) -> None:
    if mode == "single":
        worker_single(check_wire=True)
    elif mode == "single-device-only":
        worker_single(check_wire=False)
    else:
        worker_pair(mode)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2])
    else:
        sys.exit(main(sys.argv[1:]))
