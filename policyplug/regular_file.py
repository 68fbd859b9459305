"""Reading files that someone else may have replaced (a policy's includes and lists, audit logs, a
collector's heads, a key file): only a regular file is read, and never more than its reader's cap.

A FIFO would block the reader until someone writes, a device such as /dev/zero never ends, a
directory or socket is no content at all. The loader (policyplug/loader.py) and the audit readers
(policyplug/audit/files.py) both open through here and word the refusals in their own way.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path


class NotRegularFile(Exception):
    """What was opened is not a regular file; `kind` says what it is ("a FIFO", "a device", ...)."""

    def __init__(self, kind: str) -> None:
        super().__init__(f"it is {kind}, not a regular file")
        self.kind = kind


class TooLarge(Exception):
    """A file held more than the `limit` bytes its reader allows."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"it is more than the {limit} bytes allowed")
        self.limit = limit


def kind_of(mode: int) -> str:
    """What a file of st_mode `mode` is, as an error message names it."""
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def open_regular(path: str | Path) -> int:
    """A read-only, blocking descriptor of `path`, refused (NotRegularFile) unless it is a regular file.

    Opened non-blocking, so the open of a FIFO returns at once instead of waiting for a writer; the
    open descriptor is judged (fstat), not the name, so nothing swapped in after a check passes.
    Errors of the open itself propagate: OSError (ELOOP for a symlink loop), ValueError for a NUL
    in the name."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(kind_of(mode))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_capped(fd: int, limit: int) -> bytes:
    """Everything an open file holds, refused (TooLarge) once more than `limit` bytes were read: the
    cap is kept while reading, not judged by a stat() that a growing file would pass. Does not close `fd`."""
    chunks: list[bytes] = []
    total = 0
    while chunk := os.read(fd, min(1 << 20, limit + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise TooLarge(limit)
    return b"".join(chunks)


def bounded_lines(fd: int, limit: int) -> Iterator[bytes | None]:
    """The lines of an open file, each with its newline; None for a line longer than `limit` (its
    bytes are skipped, never held whole). Closes `fd` when done."""
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
