"""An audit log that many processes append to, one hash chain for all of them.

Servers that fork workers sharing no memory (Kamailio: every SIP worker runs its own Python)
cannot hand records to one writer thread. Each process appends its records itself, holding an
exclusive `flock` on a lock file beside the log while it writes: under the lock it learns the
previous record's hash (from the chain head kept in a shared mapping of the lock file, or from
the log's tail when that head does not describe the log), so the chain stays one chain, in file
order, across all workers. Either the workers write this way themselves (SharedAuditLog) or they
spool unchained lines and one timer process chains them (AuditSpool + SpoolChainer, below).

A record reaches the kernel with one `write` before the decision is enforced, so killing the
server loses nothing; the timer process (every 100 ms, adapters/kamailio/kamailio.cfg) fsyncs
the log, so a machine crash loses at most that interval.
The format, rotation and `policyplug audit verify` are those of the decision service's log
(docs/audit.md). A failing disk is counted in `stats`, logged, and never stops a decision.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import mmap
import os
import socket
import time
from pathlib import Path
from typing import Any

import orjson

from .log import GENESIS, LEVELS, build_record, canonical, last_record, shift_rotations, should_audit

log = logging.getLogger("policyplug.audit")
HEAD_BYTES = 160
RECORD_KEYS = {"v", "id", "time", "node", "policy", "policy_revision", "event", "decision"}


class RecordSink:
    """What SharedAuditLog and AuditSpool share: the audit level, building records, counting
    failures. `submit` never raises: auditing must never break a decision."""

    level: str
    include_bodies: bool
    node: str
    stats: dict[str, Any]
    where: Path

    def submit(self, event: Any, decision: Any) -> bool:
        """Record the decision if the audit level asks for it; False when not (or on failure)."""
        if not should_audit(self.level, decision):
            return False
        try:
            self.put(build_record(event, decision, node=self.node, include_bodies=self.include_bodies,
                                  record_id=os.urandom(16).hex()))
            return True
        except Exception as exc:
            self._failed(exc)
            return False

    def put(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def _failed(self, exc: BaseException) -> None:
        self.stats["errors"] += 1
        self.stats["last_error"] = f"{type(exc).__name__}: {exc}"
        self.stats["last_error_at"] = time.time()
        log.error("audit %s: %s", self.where, self.stats["last_error"])


class SharedAuditLog(RecordSink):
    """Synchronous, multi-process, hash-chained JSON Lines audit log."""

    def __init__(self, path: str | Path, *, level: str = "denied", include_bodies: bool = False,
                 node: str | None = None, max_bytes: int | None = None):
        if level not in LEVELS:
            raise ValueError(f"audit level must be one of {', '.join(LEVELS)}, not {level!r}")
        self.path = self.where = Path(path)
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

    def put(self, record: dict[str, Any]) -> None:
        # serialised before the lock is taken: workers wait on each other only for chaining and writing
        if record.keys() != RECORD_KEYS:
            raise ValueError(f"not an audit record of docs/audit.md: keys {sorted(record)}")
        self.append_bodies([canonical(record)])

    def append_bodies(self, bodies: list[bytes]) -> None:
        """Chain and append records given as canonical JSON without chain fields (as AuditSpool
        writes them), under one lock and with one write. In canonical (sorted) order the chain
        fields "prev" and "seq" come right before the top-level "time": the last ',"time":' of
        the line, as only "v" follows it."""
        if not bodies:
            return
        self._ensure_open()
        assert self._lock_fd is not None
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            fd, stat = self._current_file()
            if self._known != (stat.st_ino, stat.st_size):
                self._prev, self._seq = self._chain_head(stat)
            lines = []
            for body in bodies:
                cut = body.rfind(b',"time":')
                if cut <= 0:
                    raise ValueError(f"not an audit record: {body[:80]!r}")
                self._seq += 1
                chained = b"".join((body[:cut], b',"prev":"', self._prev.encode(), b'","seq":',
                                    str(self._seq).encode(), body[cut:]))
                self._prev = hashlib.sha256(chained).hexdigest()
                lines.append(b'{"hash":"' + self._prev.encode() + b'",' + chained[1:] + b"\n")
            data = b"".join(lines)
            os.write(fd, data)
            end = stat.st_size + len(data)
            self._known = (stat.st_ino, end)
            self._write_head(stat.st_ino, end)
            self.stats["written"] += len(bodies)
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
        shift_rotations(self.path)
        os.close(self._fd)
        # the new file exists at once and the head names it, so no writer appends to the old one
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        inode = os.fstat(self._fd).st_ino
        self._known = (inode, 0)
        self._write_head(inode, 0)



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
    """Worker side: one unchained canonical line per audited decision."""

    def __init__(self, spool_dir: str | Path, *, level: str = "denied", include_bodies: bool = False,
                 node: str | None = None):
        if level not in LEVELS:
            raise ValueError(f"audit level must be one of {', '.join(LEVELS)}, not {level!r}")
        self.dir = self.where = Path(spool_dir)
        self.level = level
        self.include_bodies = include_bodies
        self.node = node or socket.gethostname()
        self.stats: dict[str, Any] = {"written": 0, "errors": 0, "last_error": None}
        self._fd: int | None = None
        self._pid = 0
        self._size = 0
        self._part = 0

    def put(self, record: dict[str, Any]) -> None:
        line = canonical(record)
        if self._fd is None or self._pid != os.getpid() or self._size >= SPOOL_FILE_MAX:
            self._open()
        assert self._fd is not None
        os.write(self._fd, line + b"\n")
        self._size += len(line) + 1
        self.stats["written"] += 1

    def _failed(self, exc: BaseException) -> None:
        super()._failed(exc)
        self._fd = None  # reopen next time (disk freed, folder recreated)

    def _open(self) -> None:
        """spool/<pid>.jsonl; a full one is renamed <pid>.<n>.jsonl (the chainer finishes it)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        current = self.dir / f"{os.getpid()}.jsonl"
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
            self._part += 1
            os.replace(current, self.dir / f"{os.getpid()}.{self._part}.jsonl")
        self._pid = os.getpid()
        self._fd = os.open(current, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._size = os.fstat(self._fd).st_size


class SpoolChainer:
    """Timer side: move spooled records into the hash-chained log. One process runs it."""

    def __init__(self, spool_dir: str | Path, log_: SharedAuditLog):
        self.dir = Path(spool_dir)
        self.log = log_
        self.offsets_path = self.dir / "offsets.json"
        self._offsets: dict[str, int] | None = None  # by inode: a renamed spool file keeps its place

    def run_once(self) -> int:
        """Chain every complete new line; returns how many records were moved."""
        if not self.dir.is_dir():
            return 0
        if self._offsets is None:
            try:
                self._offsets = {k: int(v) for k, v in orjson.loads(self.offsets_path.read_bytes()).items()}
            except (OSError, ValueError):
                self._offsets = {}
        offsets = self._offsets
        batch: list[tuple[bytes, bytes]] = []
        finished: list[Path] = []
        seen: set[str] = set()
        for path in sorted(self.dir.glob("*.jsonl")):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                stat = os.fstat(fd)
                key = str(stat.st_ino)
                seen.add(key)
                start = offsets.get(key, 0)
                data = os.pread(fd, max(0, stat.st_size - start), start) if stat.st_size > start else b""
            finally:
                os.close(fd)
            complete = data[: data.rfind(b"\n") + 1]  # a line being written is left for next time
            for line in complete.splitlines():
                if line.strip():
                    cut = line.rfind(b',"time":"')
                    stamp = line[cut + 9: line.find(b'"', cut + 9)] if cut > 0 else b""
                    batch.append((stamp, line))
            offsets[key] = start + len(complete)
            if offsets[key] >= stat.st_size and not _writer_alive(path):
                finished.append(path)
        if batch:
            batch.sort(key=lambda item: item[0])  # stable: one worker's records keep their order
            self.log.append_bodies([line for _, line in batch])
            self.log.sync()
        for key in [k for k in offsets if k not in seen]:
            del offsets[key]
        self._save_offsets()
        for path in finished:  # fully chained and nobody writes it any more
            with contextlib.suppress(OSError):
                os.unlink(path)
        return len(batch)

    def _save_offsets(self) -> None:
        assert self._offsets is not None
        temporary = self.offsets_path.with_suffix(".tmp")
        temporary.write_bytes(orjson.dumps(self._offsets))
        os.replace(temporary, self.offsets_path)


def _writer_alive(path: Path) -> bool:
    """Is the worker that writes this spool file still writing it? (<pid>.jsonl of a live pid)"""
    parts = path.name.split(".")
    if len(parts) != 2 or not parts[0].isdigit():
        return False  # <pid>.<n>.jsonl: renamed by its worker, complete
    try:
        os.kill(int(parts[0]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
