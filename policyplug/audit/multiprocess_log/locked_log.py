"""The chained log file that every process appends to under a lock (and the timer process seals)."""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import socket
import time
from pathlib import Path
from typing import Any

import orjson

from ..log import chain_head, cut_torn_tail, shift_rotations
from ..record import GENESIS, chain, cut_parts, mark_parts, now_iso
from .sink import RecordSink, check_level, new_encoder

HEAD_BYTES = 160


class SharedAuditLog(RecordSink):
    """Synchronous, multi-process, hash-chained JSON Lines audit log."""

    def __init__(
        self,
        path: str | Path,
        *,
        level: str = "denied",
        include_bodies: bool = False,
        node: str | None = None,
        max_bytes: int | None = None,
        sealer: Any = None,
    ):
        check_level(level)
        self.path = self.where = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.level = level
        self.include_bodies = include_bodies
        self.node = node or socket.gethostname()
        self.encoder = new_encoder(self.node, include_bodies)
        self.max_bytes = max_bytes
        self.sealer = sealer  # seal.Sealer of the one process that seals (Kamailio's timer), or None
        self.stats: dict[str, Any] = {"written": 0, "errors": 0, "last_error": None}
        if sealer is not None:
            self.stats["seal"] = sealer.stats
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._head: mmap.mmap | None = None
        self._pid = os.getpid()
        # (inode, size) of the log right after our last write, and the chain head we wrote then
        self._known: tuple[int, int] | None = None
        self._prev, self._seq = GENESIS, 0

    def put_line(self, line: bytes) -> None:
        # serialised before the lock is taken: workers wait on each other only for chaining and writing
        self.append_parts([cut_parts(line)])

    def put_parts(self, head: bytes, tail: bytes) -> None:
        self.append_parts([(head, tail)])

    def append_bodies(self, bodies: list[bytes]) -> None:
        """Chain and append records given as canonical JSON without chain fields (as AuditSpool
        writes them), under one lock and with one write."""
        self.append_parts([cut_parts(body) for body in bodies])

    def append_parts(self, parts: list[tuple[bytes, bytes]]) -> None:
        """Chain (record.chain) and append unchained records given as (head, tail), under one lock
        and with one write."""
        if not parts:
            return
        fd, stat = self._lock()
        try:
            lines, prev, seq = chain(parts, self._prev.encode(), self._seq)
            self._write(fd, stat, b"".join(lines), prev, seq)
            self.stats["written"] += len(parts)
            if self.max_bytes is not None and self._known is not None and self._known[1] >= self.max_bytes:
                self._rotate()
        finally:
            self._unlock()

    def seal_if_due(self, force: bool = False) -> bool:
        """Seal the chain if this process seals, the interval is up (or `force`) and records came
        since this process's last seal (written by any process: the chain head says): the seal
        record, fsync, then the key advances (seal.py). Called by Kamailio's timer process."""
        sealer = self.sealer
        if sealer is None:
            return False
        now = time.monotonic()
        if sealer.last is None and not force:
            sealer.last = now  # the first interval starts now; a torn tail is cut (under the lock) at start
            try:
                self._lock()
                self._unlock()
            except Exception as exc:
                self.failed(exc)
            return False
        if not force and now - sealer.last < sealer.interval:
            if sealer.head_batches:  # the chain head off the host on every call (the timer: every 100 ms)
                try:
                    self._lock()
                    self._unlock()
                    sealer.batch_written(seq=self._seq, hash_=self._prev, log_path=self.path, node=self.node)
                except Exception as exc:
                    self.failed(exc)
            return False
        try:
            fd, stat = self._lock()
            try:
                if self._seq == 0 or self._seq == sealer.sealed_seq:
                    return False  # nothing new to seal
                if not sealer.checked:
                    sealer.check_log([self.path, self.path.with_name(self.path.name + ".1")])
                when = now_iso()
                parts = sealer.seal_parts(prev=self._prev, seq=self._seq + 1, time=when, node=self.node)
                lines, prev, seq = chain([parts], self._prev.encode(), self._seq)
                self._write(fd, stat, lines[0], prev, seq)
                os.fsync(fd)
                sealer.sealed(now, seq=seq, hash_=self._prev, time=when, log_path=self.path, node=self.node)
            finally:
                self._unlock()
        except Exception as exc:
            self.failed(exc)
            return False
        return True

    def _lock(self) -> tuple[int, os.stat_result]:
        """Take the lock; the current file and the chain head to continue (a torn tail cut first)."""
        self._ensure_open()
        assert self._lock_fd is not None
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            fd, stat = self._current_file()
            if self._known != (stat.st_ino, stat.st_size):
                head = self._read_head()
                if head is None or head[0] != stat.st_ino or head[1] != stat.st_size or len(head[3]) != 64:
                    # the head does not describe the file: a process killed in the middle of a write
                    # (or before it updated the head), or a first start; a torn last line is cut
                    repair = cut_torn_tail(self.path)
                    self._prev, self._seq = chain_head(self.path)
                    if repair is not None:
                        stat = os.fstat(fd)
                        lines, prev, seq = chain(
                            [mark_parts(repair, node=self.node, time=now_iso())],
                            self._prev.encode(),
                            self._seq,
                        )
                        self._write(fd, stat, lines[0], prev, seq)
                        stat = os.fstat(fd)
                        self.stats["repairs"] = self.stats.get("repairs", 0) + 1
                    else:
                        self._write_head(stat.st_ino, stat.st_size)
                else:
                    self._prev, self._seq = head[3], head[2]
                self._known = (stat.st_ino, stat.st_size)
            return fd, stat
        except BaseException:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            raise

    def _unlock(self) -> None:
        assert self._lock_fd is not None
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _write(self, fd: int, stat: os.stat_result, data: bytes, prev: bytes, seq: int) -> None:
        os.write(fd, data)
        self._prev, self._seq = prev.decode(), seq
        end = stat.st_size + len(data)
        self._known = (stat.st_ino, end)
        self._write_head(stat.st_ino, end)

    def last_record_ids(self, count: int, limit: int = 256 << 20) -> set[str]:
        """The ids of the last `count` records of the log (reading at most `limit` bytes from its end);
        a torn last line is skipped."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return set()
        try:
            end = os.fstat(fd).st_size
            start, tail = end, b""
            while start > 0 and tail.count(b"\n") <= count and end - start < limit:
                step = min(start, 1 << 20)
                start -= step
                tail = os.pread(fd, step, start) + tail
        finally:
            os.close(fd)
        ids: set[str] = set()
        for line in tail.split(b"\n")[-count - 1 :]:
            with contextlib.suppress(ValueError, TypeError, KeyError):
                ids.add(orjson.loads(line)["id"])
        return ids

    def sync(self) -> None:
        """fsync the log (any process may do it for all: fsync flushes the file, not the descriptor)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        except OSError as exc:
            self.failed(exc)
            return
        try:
            os.fsync(fd)
        except OSError as exc:
            self.failed(exc)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.sync()
        if self._head is not None:
            self._head.close()
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lock_fd = self._head = None

    # -- internals --------------------------------------------------------------------------------

    def _ensure_open(self) -> None:
        if self._pid != os.getpid():  # opened before fork: the child needs descriptors of its own
            self._fd = self._lock_fd = self._head = None
            self._known = None
            self._pid = os.getpid()
        if self._lock_fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
            if os.fstat(self._lock_fd).st_size < HEAD_BYTES:
                os.pwrite(self._lock_fd, b"\n".ljust(HEAD_BYTES), 0)
            # the head is read and written through a shared mapping: no system call per record
            self._head = mmap.mmap(self._lock_fd, HEAD_BYTES)

    def _current_file(self) -> tuple[int, os.stat_result]:
        """The descriptor and stat of the file now at `path`: another process may have rotated
        it away (the head names the current file's inode; without a head, ask the file system)."""
        if self._fd is not None:
            stat = os.fstat(self._fd)  # also checks the head's size: a crash may have come between
            head = self._read_head()
            current = head[0] if head else os.stat(self.path).st_ino if self.path.exists() else -1
            if current == stat.st_ino:
                return self._fd, stat
            os.close(self._fd)
            self._fd = None
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._known = None
        return self._fd, os.fstat(self._fd)

    # The lock file holds the chain head after the last append: "inode size seq hash". A writer
    # whose own last write is not the end of the log reads it (one small pread) instead of
    # parsing the log's tail; if it does not describe the log as it is (a crash between the two
    # writes, a log edited by hand), the tail is read after all.

    def _write_head(self, inode: int, size: int) -> None:
        assert self._lock_fd is not None
        assert self._head is not None
        self._head[:] = f"{inode} {size} {self._seq} {self._prev}\n".encode().ljust(HEAD_BYTES)

    def _read_head(self) -> tuple[int, int, int, str] | None:
        assert self._lock_fd is not None
        try:
            assert self._head is not None
            inode, size, seq, digest = self._head[:].split()[:4]
            return int(inode), int(size), int(seq), digest.decode()
        except ValueError:
            return None  # empty or torn

    def _rotate(self) -> None:
        """audit.jsonl -> .1 -> .2 ... under the lock; the chain continues in the new file."""
        assert self._fd is not None
        os.fsync(self._fd)
        shift_rotations(self.path)
        os.close(self._fd)
        # the new file exists at once and the head names it, so no writer appends to the old one
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        inode = os.fstat(self._fd).st_ino
        self._known = (inode, 0)
        self._write_head(inode, 0)
