"""The worker's side of a spooled multi-process log: records stored unchained, chained by the timer."""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import socket
import zlib
from pathlib import Path
from typing import Any

from . import fork
from .ring import FRAME, FRAME_HEAD, RING_HEADER, WRAP, SpoolRing
from .sink import RecordSink, check_level, new_encoder

log = logging.getLogger("policyplug.audit")

# -- the spool: what workers write, chained by one timer process ---------------------------------
#
# Chaining costs a lock, a look at the chain head and a hash per record, in the worker, on the
# path of the request. With a spool a worker only appends the record's canonical line to a file
# of its own (spool/<pid>.jsonl: one write, no lock); a timer process (Kamailio's rtimer, every
# 100 ms) moves every new line, in time order, into the hash-chained log with one lock and one
# write per batch, and fsyncs both. Nothing is lost when the server is killed: what was spooled
# and not yet chained is chained at the next start. Until then (at most a timer interval) a
# record sits unchained in the spool; docs/kamailio.md says so.

SPOOL_FILE_MAX = 64 << 20  # a worker starts a new spool file past this size


class AuditSpool(RecordSink):
    """Worker side: one unchained canonical record per audited decision, stored into the worker's
    ring (`ring_bytes` > 0) or, when there is none or it is full, appended to its spool file."""

    def __init__(
        self,
        spool_dir: str | Path,
        *,
        level: str = "denied",
        include_bodies: bool = False,
        node: str | None = None,
        ring_bytes: int = 0,
    ):
        check_level(level)
        if ring_bytes and (ring_bytes < 4096 or ring_bytes % 4096):
            raise ValueError(f"the ring size must be 0 or a multiple of 4096 bytes, not {ring_bytes}")
        self.dir = self.where = Path(spool_dir)
        self.level = level
        self.include_bodies = include_bodies
        self.node = node or socket.gethostname()
        self.encoder = new_encoder(self.node, include_bodies)
        self.stats: dict[str, Any] = {"written": 0, "errors": 0, "last_error": None, "overflowed": 0}
        self.ring_bytes = ring_bytes
        self._fd: int | None = None
        self._size = 0
        self._inode = 0
        self._part = 0
        self._ring: SpoolRing | None = None
        self._ring_tried = False
        self._overflowing = False  # records go to the spool file until the chainer has taken all
        self._total = self._seq = self._chained = 0  # the ring: bytes and frames written, bytes chained
        # should_audit's levels, decided once: `audit` rules always; refusals unless `none`; `all` everything
        self._none, self._all = level == "none", level == "all"
        fork.register(self)

    def submit(self, event: Any, decision: Any) -> bool:
        """RecordSink.submit in one step (this is on the path of every audited request): the audit
        level as should_audit has it, the line made, stored before the decision is enforced."""
        if not (self._all or decision.audit or (decision.decision in _REFUSALS and not self._none)):
            return False
        try:
            line = self.encoder.line(event, decision)
            if self._ring is not None and not self._overflowing and self._store(line):
                self.stats["written"] += 1  # the usual case: put_line's, without its other checks
            else:
                self.put_line(line)
            return True
        except Exception as exc:
            self.failed(exc)
            return False

    def put_line(self, line: bytes) -> None:
        # into the ring, or with one write to the spool file: either way the record is in the
        # kernel (page cache) when this returns, so a killed worker loses nothing
        if self._ring is None and not self._ring_tried:
            self._open_ring()
        if self._ring is None or (self._overflowing and not self._drained()) or not self._store(line):
            if self._fd is None or self._size >= SPOOL_FILE_MAX:
                self._open()
            os.write(self._fd, line + b"\n")  # type: ignore[arg-type]
            self._size += len(line) + 1
            if self._ring is not None:
                self._overflowing = True
                self.stats["overflowed"] += 1
        self.stats["written"] += 1

    def _store(self, line: bytes) -> bool:
        """The record as the ring's next frame; False when the ring has no room for it."""
        ring = self._ring
        assert ring is not None
        size, length = ring.size, len(line)
        need = (16 + length + 7) & ~7
        total = self._total
        at = total % size
        pad = size - at if size - at < need else 0
        if total + pad + need - self._chained > size:
            if need > size // 2:
                return False
            chained = ring.chained()  # has the chainer made room since we last looked?
            if chained is None or total + pad + need - chained > size:
                return False
            self._chained = chained
        data, seq = ring.map, self._seq
        if pad:  # the frame does not fit before the end: a WRAP frame there, the frame at the start
            if pad >= 16:
                FRAME.pack_into(data, RING_HEADER + at, zlib.crc32(FRAME_HEAD.pack(WRAP, seq)), WRAP, seq)
                seq += 1
            total += pad
            at = 0
        at += RING_HEADER
        data[at + 16 : at + 16 + length] = line  # the record first, then the frame head naming it
        FRAME.pack_into(data, at, zlib.crc32(line, zlib.crc32(FRAME_HEAD.pack(length, seq))), length, seq)
        self._total, self._seq = total + need, seq + 1
        return True

    def _drained(self) -> bool:
        """Has the chainer taken every record of the ring and of the spool file? Then the ring
        can be used again without a later record being chained before an earlier one."""
        ring = self._ring
        assert ring is not None
        chained = ring.chained()
        if chained is None or chained != self._total or ring.overflow() != (self._inode, self._size):
            return False
        self._chained, self._overflowing = chained, False
        return True

    def _open_ring(self) -> None:
        self._ring_tried = True
        if not self.ring_bytes:
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            ring = SpoolRing.create(self.dir / f"{os.getpid()}.ring", self.ring_bytes)
            # a ring left by this process (the script reloaded) or an earlier one of the same pid:
            # go on after its last complete frame
            _records, self._total, self._seq = ring.frames()
            self._chained = ring.chained() or 0
            # each page stored to once now (its own byte again: nothing changes for a reader), so the
            # file system prepares it for writing here, not on the path of a request
            data = ring.map
            for at in range(RING_HEADER, RING_HEADER + ring.size, mmap.PAGESIZE):
                data[at] = data[at]
            self._ring = ring
            spool_file = self.dir / f"{os.getpid()}.jsonl"
            if spool_file.exists() and spool_file.stat().st_size:
                self._open()
                self._overflowing = True  # its records first
        except Exception as exc:  # no ring: spool files, as without one
            log.error("audit ring in %s not usable, spooling to files: %s", self.dir, exc)
            self._ring = None

    def after_fork(self) -> None:
        """In a forked child: its records go to a ring and spool file of its own, made when first needed."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # the child's copy; the parent keeps its own
        self._fd = None
        self._part = 0
        if self._ring is not None:
            self._ring.close()  # unmaps the child's view only
        self._ring, self._ring_tried, self._overflowing = None, False, False

    def failed(self, exc: BaseException) -> None:
        super().failed(exc)
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = None  # reopen next time (disk freed, folder recreated)

    def _open(self) -> None:
        """spool/<pid>.jsonl; a full one is renamed <pid>.<n>.jsonl (the chainer finishes it)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        current = self.dir / f"{os.getpid()}.jsonl"
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._part += 1
            os.replace(current, self.dir / f"{os.getpid()}.{self._part}.jsonl")
        self._fd = os.open(current, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        stat = os.fstat(self._fd)
        self._size, self._inode = stat.st_size, stat.st_ino


_REFUSALS = ("deny", "drop")
