"""Imported last by ``syncdeco.testing``'s forkserver (its preload list).

Its one effect: every object the forkserver holds by then (torch's, mostly)
is hidden from the garbage collector (``gc.freeze``).  A rank forked from
the forkserver shares those objects' memory until it writes to it, and a
full collection in the rank writes to every object it looks at, copying
the forkserver's memory page by page.  Measured on a 2-core machine: a
forked rank that makes a Gloo group and collects once spent about 0.17 s of
CPU with the forkserver's objects in sight, 0.017 s without.
"""

from __future__ import annotations

import gc

gc.collect()
gc.freeze()
