"""What a user installing syncdeco gets: the wheel's and sdist's contents and
metadata, ``python -m syncdeco --help`` as plain text, and no warning from
``import syncdeco; syncdeco.rank()``.  CI also installs the wheel into a fresh
venv and runs it there (.ci/wheel_smoke.py)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from syncdeco.__main__ import main

ROOT = Path(__file__).resolve().parent.parent


def load_smoke() -> ModuleType:
    spec = importlib.util.spec_from_file_location("wheel_smoke", ROOT / ".ci" / "wheel_smoke.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("command", [[], ["summary"], ["plot"], ["merge"]])
def test_help_is_plain_text(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for markup in ("``", ":func:", ":data:", ":class:", ".. "):
        assert markup not in text, f"{markup!r} in:\n{text}"
    assert text.startswith(f"usage: python -m syncdeco {' '.join(command)}".rstrip())
    if not command:
        for name in ("summary", "plot", "merge", "python -m syncdeco summary trace.json"):
            assert name in text
    else:
        assert "TRACE" in text and "the JSON file syncdeco.trace() wrote" in text


def clean_env() -> dict[str, str]:
    """This environment without a launcher's variables, with this checkout first."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_", "OMPI_COMM_WORLD", "MASTER_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def test_rank_prints_nothing() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import syncdeco; print(syncdeco.rank())"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "0\n", "")


def test_numpy_is_a_dependency_because_torch_warns_without_it() -> None:
    # What the numpy dependency in pyproject.toml is for: torch's import warns
    # when numpy cannot be imported.  If this starts failing, torch stopped
    # warning, and the dependency can go.
    hide_numpy = "import sys; sys.modules['numpy'] = None; import syncdeco; syncdeco.rank()"
    result = subprocess.run(
        [sys.executable, "-c", hide_numpy],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Failed to initialize NumPy" in result.stderr


def test_the_wheel_and_sdist_hold_the_license_py_typed_and_the_plugin(tmp_path: Path) -> None:
    pytest.importorskip("build", reason="build is in the dev extra")
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info
    junk = shutil.ignore_patterns("__pycache__", "*.egg-info", ".*cache", "build", "dist")
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "CHANGELOG.md", "LICENSE", "MANIFEST.in"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("syncdeco", "tests", "examples", "benchmarks", ".ci"):
        shutil.copytree(ROOT / folder, source / folder, ignore=junk)
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path / "dist"), "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    smoke = load_smoke()
    (wheel,) = (tmp_path / "dist").glob("syncdeco-*.whl")
    (sdist,) = (tmp_path / "dist").glob("syncdeco-*.tar.gz")
    smoke.check_wheel(wheel)
    smoke.check_sdist(sdist)


def test_the_smoke_checks_catch_a_wheel_without_its_license(tmp_path: Path) -> None:
    import zipfile

    smoke = load_smoke()
    wheel = tmp_path / "syncdeco-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("syncdeco/__init__.py", "")
        zf.writestr("syncdeco/py.typed", "")
        zf.writestr("syncdeco-0.1.0.dist-info/METADATA", "Name: syncdeco\n")
        zf.writestr("syncdeco-0.1.0.dist-info/entry_points.txt", "")
    with pytest.raises(smoke.SmokeError, match="licenses/LICENSE"):
        smoke.check_wheel(wheel)
