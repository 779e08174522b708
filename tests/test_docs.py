"""The docs' code snippets that are meant to run do run, and print what the
docs say they print.

The convention (docs/contributing.md says the same, for writers):

- An HTML comment on the line before a fenced ```` ```python ```` block marks
  it to run; the comment stays invisible on the site and on GitHub:

  - ``<!-- run: python -->``: the block is a script, run with plain
    ``python`` (one process, the Null backend);
  - ``<!-- run: torchrun N -->``: run on N Gloo ranks as
    ``torchrun --standalone --nproc-per-node N`` runs them;
  - ``<!-- run: pytest -->``: the block is a test module, run with
    ``python -m pytest``.

  The script is saved under the block's ``title="NAME.py"`` if it has one
  (so that file names in its output match), else ``snippet.py``, in an empty
  directory that is also its working directory.
- ``<!-- expect -->`` on the line before a ```` ```text ```` block says that
  each of its non-empty lines is a line of the output of the last block
  marked to run (stdout and stderr together, lines of several ranks in any
  order); ``...`` in an expected line stands for any text.

Every run has a timeout and runs in its own session, killed as a whole when
it ends, so no rank is left behind.

The snippets ``LAUNCHED`` names (the getting-started job, and one ``run:
python`` script) run under the real launcher, in fresh interpreters; the
others' ranks and processes are forked from a zygote that has imported torch and syncdeco
(``zygote.py``), with torchrun's variables and an agent's store hosted by
this test for ``torchrun N``: what the snippet's code does is the same, and
each saves two seconds of CPU a process.  Real launches are tested in
test_startup.py, test_torchrun.py and test_examples.py.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import docs_output
import pytest
from scripted import run_forked, run_forked_ranks, run_script

DOCS = Path(__file__).resolve().parent.parent / "docs"
TIMEOUT = 60.0

_MARK = re.compile(r"<!--\s*(run:[^>]*?|expect)\s*-->")
_OPEN = re.compile(r"(`{3,})(\w*)([^`]*)")  # an info string has no backtick
_TITLE = re.compile(r'title="([^"]+)"')


@dataclass
class Snippet:
    page: str
    line: int
    how: list[str]  # "python", or "torchrun", "N", or "pytest"
    filename: str
    code: str
    expected: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def _blocks(text: str) -> list[tuple[int, str | None, str, str, str]]:
    """The top-level fenced blocks of a page: (line, the marker on the line
    above or None, language, the rest of the opening line, body)."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = _OPEN.fullmatch(lines[i].strip())
        if opening is None:
            i += 1
            continue
        fence, start = opening[1], i
        i += 1
        while i < len(lines) and not (
            lines[i].strip().startswith(fence) and not lines[i].strip().strip("`")
        ):
            i += 1
        mark = _MARK.fullmatch(lines[start - 1].strip()) if start else None
        body = "".join(line + "\n" for line in lines[start + 1 : i])
        blocks.append((start, mark[1] if mark else None, opening[2], opening[3], body))
        i += 1
    return blocks


def _snippets(page: Path) -> list[Snippet]:
    text = page.read_text()
    blocks = _blocks(text)
    # A marker must sit right above a fence; one shown inside a fenced block
    # (as docs/contributing.md shows them) is no marker.
    opening = {start for start, *_ in blocks}
    inside = {n for start, *_, body in blocks for n in range(start, start + body.count("\n") + 2)}
    wrong = [
        n + 1
        for n, line in enumerate(text.splitlines())
        if _MARK.fullmatch(line.strip()) and n not in inside and n + 1 not in opening
    ]
    assert not wrong, f"{page.name}: a marker not right above a fenced block, line(s) {wrong}"
    found: list[Snippet] = []
    for start, mark, lang, attrs, body in blocks:
        if mark is None:
            continue
        where = f"{page.name}:{start + 1}"
        if mark == "expect":
            if lang != "text" or not found:
                raise AssertionError(
                    f"{where}: <!-- expect --> goes above a ```text block after a run block"
                )
            found[-1].expected += [x.rstrip() for x in body.splitlines() if x.strip()]
            continue
        how = mark.removeprefix("run:").split()
        valid = how in (["python"], ["pytest"]) or (
            len(how) == 2 and how[0] == "torchrun" and how[1].isdigit()
        )
        if lang != "python" or not valid:
            raise AssertionError(
                f"{where}: <!-- {mark} --> must be run: python, run: torchrun N or "
                f"run: pytest, right above a ```python block"
            )
        title = _TITLE.search(attrs)
        default = "test_snippet.py" if how == ["pytest"] else "snippet.py"
        found.append(Snippet(page.name, start + 1, how, title[1] if title else default, body))
    return found


SNIPPETS = [s for page in sorted(DOCS.glob("*.md")) for s in _snippets(page)]
# The snippets (by file name) run as a user would, by the real launcher in
# fresh interpreters: the getting-started job, and one plain `python` script.
LAUNCHED = {"first_job.py": "torchrun", "printing_backend.py": "python"}


def test_the_docs_have_snippets_that_run() -> None:
    # A change of convention must not quietly leave nothing to run.
    kinds = {s.how[0] for s in SNIPPETS}
    assert kinds == {"python", "torchrun", "pytest"}, kinds
    assert all(s.expected for s in SNIPPETS), [s.id for s in SNIPPETS if not s.expected]


def test_a_snippet_of_each_kind_runs_under_its_real_launcher() -> None:
    # the snippets LAUNCHED names must still exist, of the kind it says
    kinds = {s.filename: s.how[0] for s in SNIPPETS if s.filename in LAUNCHED}
    assert kinds == LAUNCHED, kinds


def _matches(expected: str, line: str) -> bool:
    pattern = ".*".join(re.escape(part) for part in expected.split("..."))
    return re.fullmatch(pattern, line) is not None


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.id for s in SNIPPETS])
def test_snippet_runs(snippet: Snippet, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    script = work / snippet.filename
    script.write_text(snippet.code)
    if snippet.how[0] == "pytest":
        args = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", snippet.filename]
        out = run_script(args, tmp_path, timeout=TIMEOUT, cwd=work)
    elif snippet.filename in LAUNCHED and snippet.how[0] == "torchrun":
        args = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", snippet.how[1], snippet.filename,
        ]  # fmt: skip
        out = run_script(args, tmp_path, timeout=TIMEOUT, cwd=work)
    elif snippet.filename in LAUNCHED:
        out = run_script([sys.executable, snippet.filename], tmp_path, timeout=TIMEOUT, cwd=work)
    elif snippet.how[0] == "torchrun":
        nproc = int(snippet.how[1])
        out = run_forked_ranks([snippet.filename], nproc, tmp_path, timeout=TIMEOUT, cwd=work)
    else:
        out = run_forked([snippet.filename], tmp_path, timeout=TIMEOUT, cwd=work)
    lines = [line.rstrip() for line in out.splitlines()]
    missing = [e for e in snippet.expected if not any(_matches(e, line) for line in lines)]
    assert not missing, f"{snippet.id} did not print {missing}; it printed:\n{out}"


def test_every_output_block_is_checked_by_the_test_that_runs_its_source() -> None:
    blocks = docs_output.output_blocks()
    unknown = [f"{b.where}: {b.mark}" for b in blocks if b.mark not in docs_output.SOURCES]
    assert not unknown, f"output blocks whose source no test runs: {unknown}"
    for source, how in docs_output.SOURCES.items():
        assert any(b.mark == source for b in blocks), f"no block shows {source}'s output"
        path, name = how.checked_by.split("::")
        code = (docs_output.ROOT / path).read_text()
        # the test that runs it exists and hands its output to check()
        assert f"def {name}(" in code, how.checked_by
        assert f'docs_output.check("{source}", ' in code, f"{path} never checks {source}"


def test_code_blocks_are_the_files_they_name() -> None:
    blocks = docs_output.marked_blocks(docs_output.CODE_MARK, "python")
    assert blocks, "no <!-- code: PATH --> block"
    for block in blocks:
        shown = "".join(line + "\n" for line in block.lines)
        assert shown == (docs_output.ROOT / block.mark).read_text(), (
            f"{block.where} no longer shows {block.mark} as it is: copy it again"
        )


def test_no_page_shows_a_path_of_this_machine() -> None:
    root = str(docs_output.ROOT)
    for page in docs_output.PAGES:
        text = page.read_text()
        assert root not in text and "/tmp/pytest-" not in text, f"{page.name} shows {root}"


def test_the_site_ships_no_build_helper() -> None:
    # mkdocs copies every file of docs/ into the site; a build helper (the
    # griffe extension, its bytecode) must be listed in exclude_docs.
    config = (docs_output.ROOT / "mkdocs.yml").read_text()
    block = re.search(r"^exclude_docs: \|\n((?:  .*\n)+)", config, re.MULTILINE)
    assert block, "mkdocs.yml has no exclude_docs block"
    excluded = [line.strip() for line in block[1].splitlines()]
    assert "__pycache__/" in excluded
    shipped = {".md", ".png", ".svg", ".css"}
    helpers = [
        p.relative_to(DOCS).as_posix()
        for p in DOCS.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in shipped
    ]
    assert helpers, "docs/griffe_syncdeco.py was expected"
    assert not [h for h in helpers if h not in excluded], (helpers, excluded)
