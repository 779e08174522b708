"""Build the sdist and wheel, install the wheel as a user would, and smoke-test it.

    python .ci/wheel_smoke.py [--keep]

What a user gets from ``pip install syncdeco``, checked from outside the
checkout (so the checkout's ``syncdeco`` cannot be imported by mistake):

1. ``python -m build`` makes the sdist, then the wheel from the sdist; the
   wheel holds LICENSE, ``py.typed`` and the ``pytest11`` entry point, and its
   metadata the license, the project URLs and the dependencies.
2. A fresh venv gets ``torch==2.13.0`` first (a CPU build on this machine's
   disk: anything else downloads several GB), then the wheel with its
   ``test`` extra; nothing else.
3. In a directory outside the checkout, with the venv's Python:
   ``import syncdeco; syncdeco.rank()`` prints nothing at all (torch's
   "Failed to initialize NumPy" warning included); ``py.typed`` is installed;
   ``python -m syncdeco --help`` is plain text; a 2-rank torchrun run of
   examples/quickstart.py (copied out) works; a ``@pytest.mark.ranks(2)`` test
   runs through the installed plugin.  No output mentions NumPy.

Exits non-zero, naming the step, on the first failure.  Every step has a
timeout; a step that runs past it is killed with its whole process group.
Takes about a minute and a half on 2 cores, most of it installing torch.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"  # the CPU build on this machine's disk; see .ci/run

PLUGIN_TEST = """\
import pytest
import syncdeco as sd


@sd.on_main_only(broadcast=True)
def pick(rank):
    return {"picked_by": rank}


@pytest.mark.ranks(2, timeout=60)
def test_broadcast_through_the_installed_plugin():
    assert pick(sd.rank()) == {"picked_by": 0}
"""

IMPORT_CHECK = """\
import importlib.metadata, importlib.resources, sys
import syncdeco
assert syncdeco.__file__.startswith(sys.prefix), f"imported {syncdeco.__file__}"
assert syncdeco.rank() == 0 and syncdeco.world_size() == 1
assert importlib.resources.files("syncdeco").joinpath("py.typed").is_file(), "no py.typed"
plugins = {e.name: e.value for e in importlib.metadata.entry_points(group="pytest11")}
assert plugins.get("syncdeco") == "syncdeco.pytest_plugin", plugins
"""


class SmokeError(Exception):
    pass


def step(title: str) -> float:
    print(f"== {title}", flush=True)
    return time.monotonic()


def done(started: float) -> None:
    print(f"   ok ({time.monotonic() - started:.1f} s)", flush=True)


def run(
    cmd: list[str], *, cwd: Path, env: dict[str, str], timeout: float, what: str
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; on a non-zero exit or a timeout, raise with its output."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so a timeout kills torchrun's ranks too
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise SmokeError(f"{what}: still running after {timeout:.0f} s\n{out}\n{err}") from None
    if proc.returncode != 0:
        raise SmokeError(f"{what}: exit status {proc.returncode}\n{out}\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def no_numpy_warning(result: subprocess.CompletedProcess[str], what: str) -> None:
    for stream in (result.stdout, result.stderr):
        if "NumPy" in stream or "numpy" in stream:
            raise SmokeError(f"{what} mentions NumPy:\n{result.stdout}\n{result.stderr}")


def check_wheel(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(f"{info}/METADATA").decode()
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
    expected = {"syncdeco/__init__.py", "syncdeco/py.typed", f"{info}/licenses/LICENSE"}
    if missing := expected - names:
        raise SmokeError(f"{wheel.name} lacks {sorted(missing)}")
    if stray := sorted(n for n in names if not n.startswith(("syncdeco/", info))):
        raise SmokeError(f"{wheel.name} holds files outside the package: {stray}")
    if "[pytest11]\nsyncdeco = syncdeco.pytest_plugin" not in entry_points:
        raise SmokeError(f"{wheel.name}: no pytest11 entry point 'syncdeco':\n{entry_points}")
    headers = [line for line in metadata.splitlines() if ": " in line]
    for wanted in (
        "License-Expression: MIT",
        "License-File: LICENSE",
        "Project-URL: Homepage, ",
        "Project-URL: Documentation, ",
        "Project-URL: Changelog, ",
        "Project-URL: Issues, ",
        "Author: ",
        "Maintainer: ",
        "Requires-Dist: numpy",
        "Requires-Dist: torch",
        "Requires-Dist: wrapt",
    ):
        if not any(line.startswith(wanted) for line in headers):
            raise SmokeError(f"{wheel.name}: no {wanted!r} in its METADATA")


def check_sdist(sdist: Path) -> None:
    with tarfile.open(sdist) as tf:
        names = {name.split("/", 1)[1] for name in tf.getnames() if "/" in name}
    expected = {
        "LICENSE",
        "README.md",
        "CHANGELOG.md",
        "pyproject.toml",
        "syncdeco/py.typed",
        "tests/conftest.py",
        "examples/quickstart.py",
        ".ci/wheel_smoke.py",
    }
    if missing := expected - names:
        raise SmokeError(f"{sdist.name} lacks {sorted(missing)}")


def smoke(tmp: Path) -> None:
    # The venv's tools, with nothing of this checkout or this Python's
    # environment: no PYTHONPATH, no active venv, no user site.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.pop("VIRTUAL_ENV", None)
    env.update(PYTHONNOUSERSITE="1", TMPDIR=str(tmp), OMP_NUM_THREADS="1")

    t = step("python -m build (sdist, then the wheel from the sdist)")
    dist = tmp / "dist"
    run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)],
        cwd=ROOT,
        env=dict(os.environ),
        timeout=300,
        what="python -m build",
    )
    (wheel,) = dist.glob("syncdeco-*.whl")
    (sdist,) = dist.glob("syncdeco-*.tar.gz")
    check_wheel(wheel)
    check_sdist(sdist)
    print(f"   {wheel.name} ({wheel.stat().st_size // 1024} KiB), {sdist.name}")
    done(t)

    t = step(f"fresh venv: pip install {TORCH}, then the wheel")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp, env=env, timeout=120, what="venv")
    bin_ = venv / "bin"
    # --no-compile: byte-compiling all of torch costs more than an install
    # (112 s against 31 s, seen here); the steps below compile what they import.
    pip = [
        str(bin_ / "python"),
        "-m",
        "pip",
        "install",
        "-q",
        "--no-compile",
        "--disable-pip-version-check",
    ]
    run([*pip, TORCH], cwd=tmp, env=env, timeout=600, what=f"pip install {TORCH}")
    run([*pip, f"{wheel}[test]"], cwd=tmp, env=env, timeout=300, what="pip install the wheel")
    done(t)

    work = tmp / "outside"  # not the checkout: only the installed syncdeco imports
    work.mkdir()
    python = str(bin_ / "python")

    t = step("import syncdeco; syncdeco.rank(): py.typed, the pytest11 entry point, no output")
    result = run(
        [python, "-c", IMPORT_CHECK], cwd=work, env=env, timeout=120, what="import syncdeco"
    )
    if result.stdout or result.stderr:
        raise SmokeError(
            f"`import syncdeco; syncdeco.rank()` printed something:\n{result.stdout}{result.stderr}"
        )
    done(t)

    t = step("python -m syncdeco --help")
    result = run([python, "-m", "syncdeco", "--help"], cwd=work, env=env, timeout=60, what="--help")
    if "``" in result.stdout or ":func:" in result.stdout or "summary" not in result.stdout:
        raise SmokeError(f"python -m syncdeco --help is not plain text:\n{result.stdout}")
    done(t)

    t = step("torchrun --nproc-per-node 2 quickstart.py (copied out of the checkout)")
    shutil.copy(ROOT / "examples" / "quickstart.py", work / "quickstart.py")
    result = run(
        [str(bin_ / "torchrun"), "--nproc-per-node", "2", "quickstart.py"],
        cwd=work,
        env=env,
        timeout=120,
        what="torchrun quickstart.py",
    )
    for line in ("[rank 0/2] done", "[rank 1/2] done", "[rank 1/2] PeerFailedError: rank 0"):
        if line not in result.stdout:
            raise SmokeError(f"torchrun quickstart.py: no {line!r} in\n{result.stdout}")
    no_numpy_warning(result, "torchrun quickstart.py")
    done(t)

    t = step("pytest with the installed plugin: a @pytest.mark.ranks(2) test")
    (work / "test_smoke.py").write_text(PLUGIN_TEST)
    result = run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--strict-markers", "-W",
         "error::UserWarning", "test_smoke.py"],
        cwd=work,
        env=env,
        timeout=180,
        what="pytest test_smoke.py",
    )  # fmt: skip
    if "1 passed" not in result.stdout or "warning" in result.stdout.lower():
        raise SmokeError(f"pytest test_smoke.py:\n{result.stdout}\n{result.stderr}")
    no_numpy_warning(result, "pytest test_smoke.py")
    done(t)


def main() -> int:
    keep = "--keep" in sys.argv[1:]
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="syncdeco-wheel-smoke-"))
    try:
        smoke(tmp)
    except SmokeError as exc:
        print(f"wheel smoke test FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"wheel smoke test passed in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
