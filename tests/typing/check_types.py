"""Checked by mypy --strict (tests/test_typing.py), never run: what a type
checker sees through each decorator."""

from __future__ import annotations

from typing import Never, assert_type

import syncdeco as sd
from syncdeco.testing import Outcome, run_ranks


@sd.main_first
def load(path: str, *, shuffle: bool = False) -> list[int]:
    return []


@sd.main_first(local=True, timeout=None)
def load_local(path: str) -> bytes:
    return b""


@sd.on_main_only
def save(step: int) -> str:
    return ""


@sd.on_main_only(broadcast=True)
def vocab() -> dict[str, int]:
    return {}


@sd.on_main_only(default=0)
def count() -> int:
    return 1


@sd.barrier_after(every=100)
def step(i: int) -> float:
    return 0.0


@sd.barrier_after
@sd.on_main_only
def save_and_wait(step: int) -> str:
    return ""


@sd.on_main_only
async def fetch(url: str) -> bytes:
    return b""


@sd.main_first
async def prepare() -> int:
    return 1


class Trainer:
    @sd.barrier_after
    def train(self, steps: int) -> float:
        return 0.0

    @sd.on_main_only(broadcast=True)
    def config(self) -> dict[str, str]:
        return {}


assert_type(load("x", shuffle=True), list[int])
assert_type(load_local("x"), bytes)
assert_type(save(1), str | None)
assert_type(vocab(), dict[str, int])
assert_type(count(), int)
assert_type(step(3), float)
assert_type(save_and_wait(3), str | None)
assert_type(Trainer().train(10), float)
assert_type(Trainer().config(), dict[str, str])


@sd.on_main_only(broadcast=True)
async def fetch_all(url: str) -> bytes:
    return b""


@sd.barrier_after(every=10)
async def train_step(i: int) -> float:
    return 0.0


async def use_async() -> None:
    assert_type(await fetch("u"), bytes | None)
    assert_type(await prepare(), int)
    assert_type(await fetch_all("u"), bytes)
    assert_type(await train_step(3), float)
    async with sd.main_first(local=True) as entered:
        assert_type(entered, None)
    async with sd.barrier_after(every=2, name="epoch"):
        pass
    async with sd.main_first():
        pass


with sd.main_first(local=True):
    pass
with sd.barrier_after(every=2):
    pass
assert_type(sd.main_first(local=True), sd.MainFirst)
assert_type(sd.barrier_after(every=2), sd.BarrierAfter)
assert_type(sd.on_main_only(), sd.OnMainOnly[None])
assert_type(sd.on_main_only(default=0), sd.OnMainOnly[int])
assert_type(sd.on_main_only(broadcast=True), sd.OnMainOnly[Never])
assert_type(sd.rank(), int)
assert_type(sd.is_main(local=True), bool)
assert_type(sd.get_backend(), sd.Backend)
with sd.trace("trace.json") as nothing:
    assert_type(nothing, None)


def scenario(tmp: str) -> int:
    return sd.rank()


assert_type(run_ranks(scenario, 2, "tmp"), list[Outcome])


async def on_main_only_is_no_with_block() -> None:
    # --strict warns about an unused ignore: these lines must stay errors
    async with sd.on_main_only():  # type: ignore[attr-defined]
        pass
    with sd.on_main_only(broadcast=True):  # type: ignore[attr-defined]
        pass
