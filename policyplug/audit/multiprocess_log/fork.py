"""What a forked child must not share with its parent: record id pools, spool files and rings.

Every encoder and spool of a process registers here; a forked child resets them all
(`os.register_at_fork`; Kamailio forks in C, so its adapter's child_init calls `after_fork` too).
No getpid per record.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

_RESET: weakref.WeakSet[Any] = weakref.WeakSet()  # objects with an after_fork() method


def register(thing: Any) -> None:
    _RESET.add(thing)


def after_fork() -> None:
    """Reset what a forked child must not share with its parent: id pools and spool files."""
    for thing in list(_RESET):
        thing.after_fork()


os.register_at_fork(after_in_child=after_fork)
