"""``transport.Keys`` over a real c10d store in this process (``HashStore``:
no server, no process): what each read asks of the store."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import torch.distributed as dist

from syncdeco._plane.deadline import Deadline
from syncdeco._plane.transport import ABSENT, Keys, Late, wait_on


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


def test_a_short_wait_gives_the_connection_back_its_long_timeout() -> None:
    # The requests after a wait (a delete, a check) wait for their replies
    # with the connection's timeout: a wait that ended with a millisecond
    # left must not leave a millisecond to them.
    store = _store()
    got = wait_on(store, Deadline.after(0.2), lambda: store.get("job/w/0/u/7/2"))
    assert got == b"\x80frame of rank 2"
    assert store.timeout >= timedelta(hours=1)
    store.set_timeout(timedelta(seconds=5))
    with pytest.raises(Late):
        wait_on(store, Deadline.after(0.01), lambda: store.get("job/w/0/u/8/2"))
    assert store.timeout >= timedelta(hours=1)


def test_a_wait_with_time_to_spare_sets_the_timeout_once() -> None:
    store = Asked(_store())
    wait_on(store, Deadline.after(60.0), lambda: store.get("job/w/0/u/7/2"))
    assert store.asked == ["set_timeout", "get"]
    assert timedelta(seconds=59) < store.store.timeout <= timedelta(seconds=60)
