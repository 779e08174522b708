"""``transport.Keys`` over a real c10d store in this process (``HashStore``:
no server, no process): what each read asks of the store."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from syncdeco._plane.deadline import Deadline
from syncdeco._plane.transport import ABSENT, Keys


def _store() -> dist.HashStore:
    store = dist.HashStore()
    store.set("job/w/0/u/7/2", b"\x80frame of rank 2")
    return store


class Asked:
    """A store, with the name of each request made of it."""

    def __init__(self, store: dist.Store) -> None:
        self.store, self.asked = store, []

    def __getattr__(self, name: str) -> Any:
        self.asked.append(name)
        return getattr(self.store, name)


def test_a_lone_members_frame_already_there_is_read_in_one_request() -> None:
    store = Asked(_store())
    frames, missing = Keys(store).collect("job/w/0", 7, [2], Deadline.after(60.0))
    assert (frames, missing) == ({2: b"\x80frame of rank 2"}, [])
    assert store.asked == ["compare_set"]  # not a wait, then a read
    assert store.store.get("job/w/0/u/7/2") == b"\x80frame of rank 2"  # read, not replaced


def test_a_lone_member_not_there_yet_is_waited_for_and_no_key_is_left() -> None:
    store = Asked(_store())
    frames, missing = Keys(store).collect("job/w/0", 8, [2], Deadline.after(0.05))
    assert (frames, missing) == ({}, [2])
    assert store.asked[:3] == ["compare_set", "set_timeout", "multi_get"]  # then it waited
    assert not store.store.check(["job/w/0/u/8/2"])  # the member's key is still to be set
    assert store.store.compare_set("job/w/0/u/8/2", ABSENT, ABSENT) == ABSENT


def test_several_members_are_waited_for_together_and_the_missing_named() -> None:
    store = _store()
    frames, missing = Keys(store).collect("job/w/0", 7, [1, 2], Deadline.after(0.05))
    assert (frames, missing) == ({2: b"\x80frame of rank 2"}, [1])
