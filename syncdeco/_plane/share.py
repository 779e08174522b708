"""``on_main_only(broadcast=True, share=True)``'s request, as the main rank's
payload carries it to the backend.  No torch here: the policies import it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import final

__all__ = ["Share", "unshare"]


@final
@dataclass(frozen=True, slots=True)
class Share:
    """A broadcast result whose tensors every rank of a node should get as
    the same shared memory.  ``TorchBackend`` understands it; any other
    backend hands it on like any payload, and :func:`unshare` takes the
    value out again (each rank then has its own copy)."""

    value: object


def unshare(result: object) -> object:
    """The value of a sync point's result, without a :class:`Share` around it."""
    return result.value if isinstance(result, Share) else result
