"""Reading audit files that anyone with write access to the host may have replaced: only regular
files, and lines of bounded length (audit verify, the heads file, the syslog head reader). The
opening and the bounded lines are policyplug/regular_file.py's, shared with the loader.
"""

from __future__ import annotations

from pathlib import Path

from .. import regular_file
from ..regular_file import bounded_lines

__all__ = ["MAX_RECORD_LINE", "bounded_lines", "open_regular"]

# A record is one event of at most 1 MiB of request (the socket's limit) with its decision; JSON escapes can
# make it six times longer. A longer line is not a record, and reading it whole would take any amount of
# memory (a log replaced by a huge file without newlines).
MAX_RECORD_LINE = 64 << 20


def open_regular(path: Path) -> int:
    """A read-only descriptor of `path`, refused with a ValueError naming the path unless it is a
    regular file (a FIFO would block the reader until someone writes, a device such as /dev/zero
    never ends). OSError of the open propagates."""
    try:
        return regular_file.open_regular(path)
    except regular_file.NotRegularFile as exc:
        raise ValueError(f"{path}: not a regular file ({exc.kind})") from None
