"""An audit log that many processes append to, one hash chain for all of them.

Servers that fork workers sharing no memory (Kamailio: every SIP worker runs its own Python)
cannot hand records to one writer thread. Each process appends its records itself, holding an
exclusive `flock` on a lock file beside the log while it writes: under the lock it learns the
previous record's hash (remembered from its own last write when nobody wrote since, otherwise
read from the file's tail), so the chain stays one chain, in file order, across all workers.

A record reaches the kernel with one `write` before the decision is enforced, so killing the
server loses nothing; `sync()` (called every 200 ms by a timer process, see
adapters/kamailio/kamailio.cfg) fsyncs the file, so a machine crash loses at most that interval.
The format, rotation and `policyplug audit verify` are those of the decision service's log
(docs/audit.md). A failing disk is counted in `stats`, logged, and never stops a decision.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .log import FORMAT_VERSION, GENESIS, LEVELS, canonical, last_record, should_audit

log = logging.getLogger("policyplug.audit")
HEAD_BYTES = 160
RECORD_KEYS = {"v", "id", "time", "node", "policy", "policy_revision", "event", "decision"}


def build_record(event: Any, decision: Any, *, node: str, include_bodies: bool) -> dict[str, Any]:
    """An audit record (docs/audit.md) without its chain fields."""
    event_json = event.to_json()
    if not include_bodies:
        event_json.pop("body", None)
        event_json.pop("subject", None)
    decision_json = decision.to_json()
    return {
        "v": FORMAT_VERSION, "id": os.urandom(16).hex(), "time": datetime.now(UTC).isoformat(),
        "node": node, "policy": decision_json.pop("policy"),
        "policy_revision": decision_json.pop("policy_revision"),
        "event": event_json, "decision": decision_json,
    }


class SharedAuditLog:
    """Synchronous, multi-process, hash-chained JSON Lines audit log."""

    def __init__(self, path: str | Path, *, level: str = "denied", include_bodies: bool = False,
                 node: str | None = None, max_bytes: int | None = None):
        if level not in LEVELS:
            raise ValueError(f"audit level must be one of {', '.join(LEVELS)}, not {level!r}")
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.level = level
        self.include_bodies = include_bodies
        self.node = node or socket.gethostname()
        self.max_bytes = max_bytes
        self.stats: dict[str, Any] = {"written": 0, "errors": 0, "last_error": None}
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._head: mmap.mmap | None = None
        self._pid = os.getpid()
        # (inode, size) of the log right after our last write, and the chain head we wrote then
        self._known: tuple[int, int] | None = None
        self._prev, self._seq = GENESIS, 0

    def submit(self, event: Any, decision: Any) -> bool:
        """Append the decision's record if the audit level asks for it. Never raises."""
        if not should_audit(self.level, decision):
            return False
        try:
            record = build_record(event, decision, node=self.node, include_bodies=self.include_bodies)
            self.append(record)
            return True
        except Exception as exc:  # auditing must never break a decision
            self._failed(exc)
            return False

    def append(self, record: dict[str, Any]) -> None:
        """Chain and append one record (fields `seq`, `prev`, `hash` are set here)."""
        self._ensure_open()
        assert self._lock_fd is not None
        # Serialise before taking the lock: workers wait on each other only for the hashing and
        # the write. In canonical (sorted) order the chain fields "prev" and "seq" come right
        # before the top-level "time" (the last ',"time":' of the line; only "v" follows it).
        spliceable = record.keys() == RECORD_KEYS
        body = canonical(record) if spliceable else b""
        cut = body.rfind(b',"time":')
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            fd, stat = self._current_file()
            if self._known != (stat.st_ino, stat.st_size):
                self._prev, self._seq = self._chain_head(stat)  # another process wrote since
            self._seq += 1
            if spliceable and cut > 0:
                body = b"".join((body[:cut], b',"prev":"', self._prev.encode(), b'","seq":',
                                 str(self._seq).encode(), body[cut:]))
            else:
                record["seq"], record["prev"] = self._seq, self._prev
                body = canonical(record)
            digest = hashlib.sha256(body).hexdigest()
            line = b'{"hash":"' + digest.encode() + b'",' + body[1:] + b"\n"
            os.write(fd, line)
            self._prev = digest
            end = stat.st_size + len(line)
            self._known = (stat.st_ino, end)
            self._write_head(stat.st_ino, end)
            self.stats["written"] += 1
            if self.max_bytes is not None and end >= self.max_bytes:
                self._rotate()
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def sync(self) -> None:
        """fsync the log (any process may do it for all: fsync flushes the file, not the descriptor)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        except OSError as exc:
            self._failed(exc)
            return
        try:
            os.fsync(fd)
        except OSError as exc:
            self._failed(exc)
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

    def _chain_head(self, stat: os.stat_result) -> tuple[str, int]:
        head = self._read_head()
        if head is not None and head[0] == stat.st_ino and head[1] == stat.st_size and len(head[3]) == 64:
            return head[3], head[2]
        prev, seq = last_record(self.path)
        if prev == GENESIS:
            rotated = self.path.with_name(self.path.name + ".1")
            if rotated.exists():
                prev, seq = last_record(rotated)
        return prev, seq

    def _rotate(self) -> None:
        """audit.jsonl -> .1 -> .2 ... under the lock; the chain continues in the new file."""
        assert self._fd is not None
        os.fsync(self._fd)
        index = 1
        while self.path.with_name(f"{self.path.name}.{index}").exists():
            index += 1
        for i in range(index, 1, -1):
            os.replace(self.path.with_name(f"{self.path.name}.{i - 1}"), self.path.with_name(f"{self.path.name}.{i}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        os.close(self._fd)
        # the new file exists at once and the head names it, so no writer appends to the old one
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        inode = os.fstat(self._fd).st_ino
        self._known = (inode, 0)
        self._write_head(inode, 0)

    def _failed(self, exc: BaseException) -> None:
        self.stats["errors"] += 1
        self.stats["last_error"] = f"{type(exc).__name__}: {exc}"
        self.stats["last_error_at"] = time.time()
        log.error("audit log %s: %s", self.path, self.stats["last_error"])
