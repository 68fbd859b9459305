"""Reading audit files that anyone with write access to the host may have replaced: only regular
files, and lines of bounded length (audit verify, the heads file, the syslog head reader).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

# A record is one event of at most 1 MiB of request (the socket's limit) with its decision; JSON escapes can
# make it six times longer. A longer line is not a record, and reading it whole would take any amount of
# memory (a log replaced by a huge file without newlines).
MAX_RECORD_LINE = 64 << 20


def open_regular(path: Path) -> int:
    """A read-only descriptor of `path`, refused unless it is a regular file: a FIFO would block the
    reader until someone writes, a device such as /dev/zero never ends. O_NONBLOCK makes the open of a
    FIFO return at once, and fstat judges what was opened (no race with a rename)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{path}: not a regular file (a FIFO, device or socket)")
    os.set_blocking(fd, True)
    return fd


def bounded_lines(fd: int, limit: int) -> Iterator[bytes | None]:
    """The lines of an open file, each with its newline; None for a line longer than `limit` (its
    bytes are skipped, never held whole)."""
    with os.fdopen(fd, "rb") as file:
        while True:
            line = file.readline(limit + 1)
            if not line:
                return
            if len(line) > limit and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):
                    line = file.readline(1 << 20)
                yield None
                continue
            yield line
