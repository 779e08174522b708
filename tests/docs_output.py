"""The output blocks of the README and the docs, checked against what the
code they show prints.

A ```` ```text ```` block right below ``<!-- output: SOURCE -->`` shows lines
that SOURCE prints (an example, a script of the tests).  The test that runs
SOURCE (``SOURCES`` names it) hands its output to :func:`check`, so one run
checks every block that shows it, and adds no process launch of its own.
Each non-empty line of a block must be a line of that output once both are
masked: durations (``1s ago``, ``0.03s``, ``99 times``) and, for a source
whose figures vary from run to run, every number and run of spaces.  The
repository's own directory is shown as ``/path/to/syncdeco``, so no machine's
path gets into the docs.

A block that no longer matches fails its test with a diff, and
``SYNCDECO_REFRESH_DOCS=1`` rewrites it from the output (review the diff).

``<!-- code: PATH -->`` right above a ```` ```python ```` block says that the
block is PATH, a file of the repository, as it is (tests/test_docs.py checks
it), so that output shown from PATH is output of the code shown.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PLACEHOLDER = "/path/to/syncdeco"
REFRESH = "SYNCDECO_REFRESH_DOCS"


@dataclass(frozen=True)
class Source:
    checked_by: str  # the test that runs it and calls check()
    numbers_vary: bool = False  # timings in columns: mask every number


SOURCES = {
    "examples/when_things_go_wrong.py": Source(
        "tests/test_examples.py::test_when_things_go_wrong_on_two_gloo_ranks"
    ),
    "tests/scripts/first_failure.py": Source(
        "tests/test_messages.py::"
        "test_each_rank_prints_one_whole_prefixed_traceback_at_the_first_sync_point",
        numbers_vary=True,  # line numbers: of syncdeco's own file too
    ),
    "tests/scripts/killed.py": Source(
        "tests/test_torchrun.py::test_a_killed_rank_is_named_within_5s_under_a_slow_monitor"
    ),
    "tests/scripts/node_ranks.py (a lost node)": Source(
        "tests/test_multinode.py::test_a_lost_torchrun_node_is_named_by_every_survivor"
    ),
    "tests/scripts/failfast_ranks.py (a lost node)": Source(
        "tests/test_failfast.py::test_a_node_lost_while_the_others_are_in_their_all_reduce_ends_them"
    ),
    "tests/scripts/failfast_ranks.py (another node)": Source(
        "tests/test_failfast.py::"
        "test_a_node_lost_ends_the_ranks_of_every_other_node_not_only_the_watchers"
    ),
    "python -m syncdeco where (tests/scripts/where_job.py)": Source(
        "tests/test_where.py::test_where_shows_each_rank_of_a_hung_torchrun_job_then_says_it_ended",
        numbers_vary=True,
    ),
    "summary of examples/ddp_checkpoint.py": Source(
        "tests/test_examples.py::test_ddp_checkpoint_resumes_on_two_gloo_ranks",
        numbers_vary=True,
    ),
}

OUTPUT_MARK = re.compile(r"<!--\s*output:\s*(.+?)\s*-->")
CODE_MARK = re.compile(r"<!--\s*code:\s*(.+?)\s*-->")
_DURATION = re.compile(r"\d+(?:\.\d+)?(?=(?:s|ms| ms|µs| times)\b)")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 0-based index of the opening fence
    mark: str  # what the marker names: a source, or a file
    lines: tuple[str, ...]  # the block's body

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line + 1}"


def marked_blocks(mark: re.Pattern[str], language: str) -> list[Block]:
    """The fenced blocks right below a ``mark`` comment, on every page.  A
    marker shown inside a fenced block (as docs/contributing.md shows them)
    is no marker."""
    found = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        fence = None
        for i, line in enumerate(lines):
            stripped = line.strip()
            if fence is not None:
                if stripped == fence:
                    fence = None
                continue
            if stripped.startswith("```"):
                fence = stripped[: len(stripped) - len(stripped.lstrip("`"))]
                continue
            m = mark.fullmatch(stripped)
            if m is None:
                continue
            opening = lines[i + 1].strip() if i + 1 < len(lines) else ""
            assert re.fullmatch(rf"```{language}\b.*", opening), (
                f"{page.name}:{i + 1}: {stripped} must be right above a ```{language} block"
            )
            end = next(j for j in range(i + 2, len(lines)) if lines[j].strip() == "```")
            found.append(Block(page, i + 1, m[1], tuple(lines[i + 2 : end])))
    return found


def output_blocks() -> list[Block]:
    return marked_blocks(OUTPUT_MARK, "text")


def mask(line: str, *, numbers: bool) -> str:
    line = _DURATION.sub("N", line.rstrip())
    if numbers:
        line = re.sub(r"\s+", " ", _NUMBER.sub("N", line)).strip()
    return line


def shown(output: str) -> list[str]:
    """The non-empty lines of ``output`` as the docs show them."""
    text = output.replace(str(ROOT), PLACEHOLDER)
    return [line.rstrip() for line in text.splitlines() if line.strip()]


def check(source: str, output: str) -> None:
    """Every block that shows ``source``'s output shows lines ``output`` has.

    Fails with a diff naming the page and line, or, with
    ``SYNCDECO_REFRESH_DOCS=1`` in the environment, rewrites the lines that
    differ from the printed lines closest to them."""
    numbers = SOURCES[source].numbers_vary
    printed = {mask(line, numbers=numbers): line for line in shown(output)}
    blocks = [b for b in output_blocks() if b.mark == source]
    assert blocks, f"no <!-- output: {source} --> block in the README or the docs"
    problems = []
    for block in blocks:
        wrong = [
            (n, line)
            for n, line in enumerate(block.lines)
            if line.strip() and mask(line, numbers=numbers) not in printed
        ]
        if not wrong:
            continue
        new = list(block.lines)
        for n, line in wrong:
            close = difflib.get_close_matches(
                mask(line, numbers=numbers), list(printed), n=1, cutoff=0.5
            )
            new[n] = printed[close[0]] if close else line
        if os.environ.get(REFRESH) == "1":
            _rewrite(block, new)
        diff = "\n".join(
            difflib.unified_diff(
                block.lines, new, f"{block.where} (shown)", "printed now", lineterm=""
            )
        )
        listed = "\n".join(f"  {line}" for _, line in wrong)
        problems.append(f"{block.where}: lines that {source} no longer prints:\n{listed}\n{diff}")
    if problems:
        how = (
            "rewritten from this run: review `git diff` and run the test again"
            if os.environ.get(REFRESH) == "1"
            else f"refresh with: {REFRESH}=1 python -m pytest {SOURCES[source].checked_by}"
        )
        raise AssertionError("\n\n".join([*problems, how]) + f"\n\nall it printed:\n{output}")


def _rewrite(block: Block, new: list[str]) -> None:
    lines = block.page.read_text().splitlines(keepends=True)
    body = slice(block.line + 1, block.line + 1 + len(block.lines))
    lines[body] = [line + "\n" for line in new]
    block.page.write_text("".join(lines))
