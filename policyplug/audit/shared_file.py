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
import gc
import hashlib
import logging
import mmap
import operator
import os
import socket
import struct
import time
import weakref
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from .log import (
    FORMAT_VERSION,
    GENESIS,
    LEVELS,
    build_record,
    canonical,
    encode_decision,
    encode_event,
    last_record,
    policy_part,
    shift_rotations,
    should_audit,
)

log = logging.getLogger("policyplug.audit")
HEAD_BYTES = 160
RECORD_KEYS = {"v", "id", "time", "node", "policy", "policy_revision", "event", "decision"}


# -- records as bytes --------------------------------------------------------------------------
#
# A worker's record is one line of canonical JSON without the chain fields, put together from
# serialised parts instead of build_record's dicts and a full dump: the event through
# log.encode_event, the decision with the policy and node members remembered by Decision.shape()
# (a policy makes few distinct decisions), ids cut from a pool of random bytes. The bytes are those
# of canonical(build_record(...)) (tested, and checked once at import: if the Event or Decision
# JSON ever changes, the slow path is taken instead).

DECISION_CACHE_SIZE = 1024
ID_POOL = 256  # record ids drawn per os.urandom call


class RecordEncoder:
    """Audit records (docs/audit.md) without `seq`, `prev` and `hash`, as canonical JSON bytes."""

    def __init__(self, node: str, include_bodies: bool):
        self.node = node
        self.include_bodies = include_bodies
        self._node_part = b',"node":' + orjson.dumps(node)
        # Decision.shape() -> ('{"decision":...,"event":', '","node":...,"policy_revision":...,"time":')
        self._decisions: dict[tuple[Any, ...], tuple[bytes, bytes]] = {}
        self._ids = b""  # a pool of random hex ids, drawn from by new_id
        self._next_id = 0
        _ENCODERS.add(self)
        if not _FAST:
            self.line = self._built_line  # type: ignore[method-assign]

    def line(self, event: Any, decision: Any, *, record_id: str | None = None, time: datetime | None = None,
             end: bytes = b"") -> bytes:
        """canonical(build_record(event, decision, ...)) + `end`; `time` defaults to now (UTC)."""
        shape = decision.shape()  # None: not cached (an evaluation error, lists set by hand)
        parts = self._decisions.get(shape) if shape is not None else None
        if parts is None:
            parts = self._parts(decision)
            if shape is not None:
                if len(self._decisions) >= DECISION_CACHE_SIZE:
                    self._decisions.clear()
                self._decisions[shape] = parts
        head, middle = parts
        rid = self._draw_id() if record_id is None else record_id.encode()
        return b"".join((head, encode_event(event, self.include_bodies), b',"id":"', rid, middle,
                         orjson.dumps(time or datetime.now(UTC)), _VERSION_PART, end))

    def _parts(self, decision: Any) -> tuple[bytes, bytes]:
        encoded, policy, revision = encode_decision(decision)
        return (b'{"decision":' + encoded + b',"event":',
                b'"' + self._node_part + policy_part(policy, revision) + b',"time":')

    def _built_line(self, event: Any, decision: Any, *, record_id: str | None = None,
                    time: datetime | None = None, end: bytes = b"") -> bytes:
        record = build_record(event, decision, node=self.node, include_bodies=self.include_bodies,
                              record_id=record_id or self.new_id(), time=(time or datetime.now(UTC)).isoformat())
        return canonical(record) + end

    def new_id(self) -> str:
        """A random 128-bit id in hex, as build_record makes."""
        return self._draw_id().decode()

    def _draw_id(self) -> bytes:
        start = self._next_id
        if start >= len(self._ids):
            self._ids, start = os.urandom(16 * ID_POOL).hex().encode(), 0
        self._next_id = start + 32
        return self._ids[start:start + 32]

    def after_fork(self) -> None:
        """A forked child must not hand out the ids left in its parent's pool."""
        self._ids, self._next_id = b"", 0


_VERSION_PART = b',"v":' + str(FORMAT_VERSION).encode() + b"}"
# Every encoder and spool of this process: a forked child resets them (os.register_at_fork below;
# Kamailio forks in C, so the adapter's child_init calls after_fork too). No getpid per record.
_ENCODERS: weakref.WeakSet[RecordEncoder] = weakref.WeakSet()
_SPOOLS: weakref.WeakSet[AuditSpool] = weakref.WeakSet()


def after_fork() -> None:
    """Reset what a forked child must not share with its parent: id pools and spool files."""
    for encoder in list(_ENCODERS):
        encoder.after_fork()
    for spool in list(_SPOOLS):
        spool.after_fork()


def _fast_records_match() -> bool:
    """The fast path gives canonical(build_record()) for a few decisions (checked once, at import)."""
    from ..decision import Decision
    from ..events import Event
    try:
        event = Event.message("alice@acme.example", "bob@partner.example", body="b", subject="s",
                              headers={"x-a": "1"}, client={"ip": "192.0.2.1", "port": 5060, "secure": True})
        decisions = [Decision("deny", "r1", reason="no", policy="p", policy_revision="sha256:1"),
                     Decision("allow", "r2", copy_to=["a@b.example"], disclaimers=["d"], tags=["t"], audit=True,
                              redirect_to="x@y.example", route_via="sip:h", policy="p", policy_revision="sha256:1"),
                     Decision("allow", "r2", copy_to=("a@b.example",), disclaimers=("d",), tags=("t",),  # type: ignore[arg-type]
                              audit=True, policy="p", policy_revision="sha256:1"),
                     Decision("deny", None, errors=[{"rule": "r", "error": "e"}], policy="p", policy_revision="2")]
        now = datetime.now(UTC)
        for bodies in (False, True):
            encoder = RecordEncoder("node-ü", bodies)
            for decision in decisions * 2:  # the second time from the cache
                expected = canonical(build_record(event, decision, node="node-ü", include_bodies=bodies,
                                                  record_id="0" * 32, time=now.isoformat()))
                if encoder.line(event, decision, record_id="0" * 32, time=now) != expected:
                    return False
        return True
    except Exception:  # pragma: no cover - whatever changed, the slow path is right
        return False


_FAST = True  # while checking
_FAST = _fast_records_match()


class RecordSink:
    """What SharedAuditLog and AuditSpool share: the audit level, building records, counting
    failures. `submit` never raises: auditing must never break a decision."""

    level: str
    include_bodies: bool
    node: str
    stats: dict[str, Any]
    where: Path
    encoder: RecordEncoder

    def submit(self, event: Any, decision: Any) -> bool:
        """Record the decision if the audit level asks for it; False when not (or on failure)."""
        if not should_audit(self.level, decision):
            return False
        try:
            self.put_line(self.encoder.line(event, decision))
            return True
        except Exception as exc:
            self._failed(exc)
            return False

    def put(self, record: dict[str, Any]) -> None:
        """A record made by log.build_record (without chain fields)."""
        if record.keys() != RECORD_KEYS:
            raise ValueError(f"not an audit record of docs/audit.md: keys {sorted(record)}")
        self.put_line(canonical(record))

    def put_line(self, line: bytes) -> None:
        """A record as canonical JSON without chain fields (RecordEncoder.line)."""
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
        self.encoder = RecordEncoder(self.node, include_bodies)
        self.max_bytes = max_bytes
        self.stats: dict[str, Any] = {"written": 0, "errors": 0, "last_error": None}
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._head: mmap.mmap | None = None
        self._pid = os.getpid()
        # (inode, size) of the log right after our last write, and the chain head we wrote then
        self._known: tuple[int, int] | None = None
        self._prev, self._seq = GENESIS, 0

    def put_line(self, line: bytes) -> None:
        # serialised before the lock is taken: workers wait on each other only for chaining and writing
        self.append_bodies([line])

    def append_bodies(self, bodies: list[bytes]) -> None:
        """Chain and append records given as canonical JSON without chain fields (as AuditSpool
        writes them), under one lock and with one write. In canonical (sorted) order the chain
        fields "prev" and "seq" come right before the top-level "time": the last ',"time":' of
        the line, as only "v" follows it."""
        cut_bodies = []
        for body in bodies:
            cut = body.rfind(b',"time":')
            if cut <= 0:
                raise ValueError(f"not an audit record: {body[:80]!r}")
            cut_bodies.append((None, body, cut))
        self.append_cut(cut_bodies)

    def append_cut(self, cut_bodies: list[tuple[Any, bytes, int]]) -> None:
        """append_bodies of (anything, body, where its top-level ',"time":' starts): SpoolChainer's
        batch as it is, (sort key, body, cut)."""
        if not cut_bodies:
            return
        self._ensure_open()
        assert self._lock_fd is not None
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            fd, stat = self._current_file()
            if self._known != (stat.st_ino, stat.st_size):
                self._prev, self._seq = self._chain_head(stat)
            parts: list[bytes] = []
            add, join, sha256 = parts.extend, b"".join, hashlib.sha256
            prev, seq = self._prev.encode(), self._seq
            for _key, body, cut in cut_bodies:
                seq += 1
                chained = join((body[:cut], b',"prev":"', prev, b'","seq":', b"%d" % seq, body[cut:]))
                prev = sha256(chained).hexdigest().encode()
                add((b'{"hash":"', prev, b'",', chained[1:], b"\n"))
            data = join(parts)
            os.write(fd, data)
            self._prev, self._seq = prev.decode(), seq
            end = stat.st_size + len(data)
            self._known = (stat.st_ino, end)
            self._write_head(stat.st_ino, end)
            self.stats["written"] += len(cut_bodies)
            if self.max_bytes is not None and end >= self.max_bytes:
                self._rotate()
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

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
        for line in tail.split(b"\n")[-count - 1:]:
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


# -- the ring: a spool reused in place -------------------------------------------------------------
#
# Appending to a spool file costs a `write` system call per record and, as the file grows, new
# page-cache pages. A worker's ring (spool/<pid>.ring) is a file of fixed size mapped into the
# worker (MAP_SHARED) and reused in place: a record is stored into the mapping, so it is in the
# kernel's page cache when the store is done (a SIGKILL of the worker loses nothing it stored) and
# the chainer reads it through its own mapping of the same file. No system call, no new pages.
#
#   header (RING_HEADER bytes): magic, data size; written by the chainer only: how far it has
#     chained (a byte count over all laps) with the sequence number of the next frame, in two slots
#     written in turn (generation, position, seq, CRC: a store torn by a kill or caught half done
#     leaves the other slot, the older position, which is the safe side for the worker deciding
#     whether the ring has room); and how far it has chained the worker's overflow spool file
#     (inode, offset, CRC)
#   frames, 8-byte aligned: CRC-32 (u32) of what follows it, length (u32), seq (u64), the record. The chainer takes a frame only when its seq is the next one and its CRC matches:
#     a frame being written (or torn by a kill) is never read, whatever order the stores become
#     visible in; a frame of an earlier lap has an older seq. A frame does not wrap: when it would
#     not fit before the end, a WRAP frame (length 0xFFFFFFFF) is stored there (or, with fewer than
#     16 bytes left, nothing) and the frame goes to the start.
#
# A full ring (the chainer has not caught up) sends records to the worker's spool file
# (<pid>.jsonl), and they keep going there until the chainer has taken everything from both, so a
# worker's records are chained in the order it wrote them (the chainer reads spool files before rings).

RING_MAGIC = b"ppring01"
RING_HEADER = 4096
RING_BYTES = 4 << 20  # the adapter's default (`audit_ring_bytes`); 0: no ring, spool files only
_FRAME_HEAD = struct.Struct("<IQ")  # length, seq
_FRAME = struct.Struct("<IIQ")  # crc (of what follows it: length, seq, the record), length, seq
_SLOT = struct.Struct("<QQQQ")  # generation, chained bytes, next seq, crc of the first three
_SLOT_HEAD = struct.Struct("<QQQ")
_SLOTS_AT = (16, 48)
_OVERFLOW = struct.Struct("<QQQ")  # inode and chained offset of the overflow spool file, crc
_OVERFLOW_HEAD = struct.Struct("<QQ")
_OVERFLOW_AT = 80
_WRAP = 0xFFFFFFFF


class SpoolRing:
    """One worker's ring file, as its writer (the worker) or its reader (the chainer) sees it."""

    def __init__(self, path: Path, fd: int, mapping: mmap.mmap, size: int):
        self.path = path
        self.fd = fd
        self.map = mapping
        self.size = size  # of the data area
        self.inode = os.fstat(fd).st_ino

    @classmethod
    def create(cls, path: Path, size: int) -> SpoolRing:
        """The ring at `path`, made (zero-filled, so no page is allocated later) unless it exists."""
        if not path.exists():
            temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
            try:
                header = bytearray(RING_HEADER)
                header[:16] = RING_MAGIC + struct.pack("<Q", size)
                _SLOT.pack_into(header, _SLOTS_AT[1], 1, 0, 1, zlib.crc32(_SLOT_HEAD.pack(1, 0, 1)))
                os.write(fd, header)
                zeros = bytes(1 << 20)
                for start in range(0, size, len(zeros)):
                    os.write(fd, zeros[:min(len(zeros), size - start)])
            finally:
                os.close(fd)
            os.replace(temporary, path)  # complete before the chainer can see it
        ring = cls.open(path)
        if ring is None:
            raise OSError(f"{path}: not a spool ring")
        return ring

    @classmethod
    def open(cls, path: Path) -> SpoolRing | None:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            head = os.pread(fd, 16, 0)
            size = struct.unpack_from("<Q", head, 8)[0] if len(head) == 16 else 0
            if head[:8] != RING_MAGIC or size < 4096 or size % 8 or os.fstat(fd).st_size != RING_HEADER + size:
                os.close(fd)
                return None
            mapping = mmap.mmap(fd, RING_HEADER + size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, mapping, size)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)

    # -- the chainer's values in the header --------------------------------------------------------

    def position(self) -> tuple[int, int, int] | None:
        """(generation, bytes chained, seq of the next frame) of the newest intact slot."""
        best = None
        for at in _SLOTS_AT:
            generation, chained, seq, crc = _SLOT.unpack_from(self.map, at)
            if zlib.crc32(_SLOT_HEAD.pack(generation, chained, seq)) == crc and (best is None or generation > best[0]):
                best = (generation, chained, seq)
        return best

    def set_position(self, chained: int, seq: int) -> None:
        current = self.position()
        generation = (current[0] if current else 0) + 1
        _SLOT.pack_into(self.map, _SLOTS_AT[generation % 2], generation, chained, seq,
                        zlib.crc32(_SLOT_HEAD.pack(generation, chained, seq)))

    def chained(self) -> int | None:
        position = self.position()
        return position[1] if position else None

    def overflow(self) -> tuple[int, int] | None:
        inode, done, crc = _OVERFLOW.unpack_from(self.map, _OVERFLOW_AT)
        return (inode, done) if zlib.crc32(_OVERFLOW_HEAD.pack(inode, done)) == crc else None

    def set_overflow(self, inode: int, done: int) -> None:
        _OVERFLOW.pack_into(self.map, _OVERFLOW_AT, inode, done, zlib.crc32(_OVERFLOW_HEAD.pack(inode, done)))

    # -- reading (the chainer) -----------------------------------------------------------------------

    def frames(self, into: list[Any] | None = None,
               bad: list[bytes] | None = None) -> tuple[list[Any], int, int]:
        """The complete records after the chained ones: (records, byte count, seq) after them.

        With `into` (the chainer), each record is added to that list as it is found, keyed for
        sorting: (its time, as far as it sorts; the record; where its ',"time":"' starts), and a
        record without that (not an audit record) to `bad` instead."""
        position = self.position()
        if position is None:
            raise ValueError(f"{self.path.name}: damaged header")
        _generation, total, seq = position
        size, data = self.size, self.map
        records: list[Any] = [] if into is None else into
        add = records.append
        view, unpack, crc32, header = memoryview(data), _FRAME.unpack_from, zlib.crc32, RING_HEADER
        limit = total + size
        at = total % size  # where `total` is in the data area
        try:
            while total < limit:
                room = size - at
                if room < 16:
                    total += room
                    at = 0
                    continue
                start = at + header
                crc, length, frame_seq = unpack(data, start)
                if frame_seq != seq:
                    break  # not written yet (an older lap's frame)
                if length == _WRAP:
                    if crc32(view[start + 4:start + 16]) != crc:
                        break
                    total += room
                    at = 0
                    seq += 1
                    continue
                if length > room - 16 or crc32(view[start + 4:start + 16 + length]) != crc:
                    break  # being written
                record = data[start + 16:start + 16 + length]
                if into is None:
                    add(record)
                else:
                    cut = record.rfind(b',"time":"')
                    if cut > 0:
                        add((record[cut + 9:cut + 41], record, cut))
                    elif bad is not None:
                        bad.append(record)
                length = (23 + length) & ~7  # the frame's size
                total += length
                at += length
                seq += 1
        finally:
            view.release()
        return records, total, seq


class AuditSpool(RecordSink):
    """Worker side: one unchained canonical record per audited decision, stored into the worker's
    ring (`ring_bytes` > 0) or, when there is none or it is full, appended to its spool file."""

    def __init__(self, spool_dir: str | Path, *, level: str = "denied", include_bodies: bool = False,
                 node: str | None = None, ring_bytes: int = 0):
        if level not in LEVELS:
            raise ValueError(f"audit level must be one of {', '.join(LEVELS)}, not {level!r}")
        if ring_bytes and (ring_bytes < 4096 or ring_bytes % 4096):
            raise ValueError(f"the ring size must be 0 or a multiple of 4096 bytes, not {ring_bytes}")
        self.dir = self.where = Path(spool_dir)
        self.level = level
        self.include_bodies = include_bodies
        self.node = node or socket.gethostname()
        self.encoder = RecordEncoder(self.node, include_bodies)
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
        _SPOOLS.add(self)

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
            self._failed(exc)
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
                _FRAME.pack_into(data, RING_HEADER + at, zlib.crc32(_FRAME_HEAD.pack(_WRAP, seq)), _WRAP, seq)
                seq += 1
            total += pad
            at = 0
        at += RING_HEADER
        data[at + 16:at + 16 + length] = line  # the record first, then the frame head naming it
        _FRAME.pack_into(data, at, zlib.crc32(line, zlib.crc32(_FRAME_HEAD.pack(length, seq))), length, seq)
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

    def _failed(self, exc: BaseException) -> None:
        super()._failed(exc)
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
os.register_at_fork(after_in_child=after_fork)


OFFSETS_SLOT = 1 << 20  # bytes per slot of the offsets file (two slots; sparse)
READ_CHUNK = 1 << 20     # a spool file is read this much at a time


class SpoolChainer:
    """Timer side: move spooled records into the hash-chained log. One process runs it."""

    def __init__(self, spool_dir: str | Path, log_: SharedAuditLog):
        self.dir = Path(spool_dir)
        self.log = log_
        self.offsets_path = self.dir / "offsets"
        self.legacy_offsets_path = self.dir / "offsets.json"  # before the two-slot file
        self._offsets: dict[str, int] | None = None  # by inode: a renamed spool file keeps its place
        self._saved: dict[str, int] = {}
        self._generation = 0
        self._offsets_fd: int | None = None
        self._rings: dict[str, SpoolRing] = {}  # by file name, mapped once
        self._first_run = True  # the first batch may repeat what ends the log (see _drop_chained)

    def run_once(self) -> int:
        """Chain every complete new record; returns how many were moved. Spool files are read
        before rings: a worker's records that overflowed into its file were written after those
        in its ring, and any it writes to its ring after them come once both are chained.

        The garbage collector is off meanwhile: a batch holds a few tuples per record (thousands
        every 100 ms), which would set off collections that find nothing (they make no cycles)."""
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run_once()
        finally:
            if enabled:
                gc.enable()

    def _run_once(self) -> int:
        try:
            names = os.listdir(self.dir)  # one look at the folder (not a glob per kind of file)
        except OSError:
            return 0
        if self._offsets is None:
            self._offsets = self._load_offsets()
        offsets = self._offsets
        batch: list[tuple[bytes, bytes, int]] = []  # (time, line, where its ',"time":' starts)
        finished: list[Path] = []
        finished_at: dict[Path, tuple[str, int]] = {}  # finished spool files: (inode key, offset)
        seen: set[str] = set()
        spooled: dict[str, tuple[int, int]] = {}  # <pid>.jsonl -> (inode, offset chained after this batch)
        for path in [self.dir / name for name in sorted(names) if name.endswith(".jsonl")]:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                stat = os.fstat(fd)
                key = str(stat.st_ino)
                seen.add(key)
                start = offsets.get(key, 0)
                data = os.pread(fd, min(stat.st_size - start, READ_CHUNK), start) if stat.st_size > start else b""
                if len(data) == READ_CHUNK and b"\n" not in data:  # one very long line: all of it
                    data = os.pread(fd, stat.st_size - start, start)
            finally:
                os.close(fd)
            done = data.rfind(b"\n") + 1  # what follows the last newline: a line being written
            lines = data.split(b"\n")
            lines.pop()  # (left for next time)
            for line in lines:
                cut = line.rfind(b',"time":"')
                if cut > 0:
                    batch.append((line[cut + 9:line.find(b'"', cut + 9)], line, cut))
                elif line.strip():  # not a record: kept out of the chain, and said
                    self.log._failed(ValueError(f"{path.name}: not an audit record: {line[:80]!r}"))
            offsets[key] = end = start + done
            spooled[path.name] = (stat.st_ino, end)
            if end >= stat.st_size and not _writer_alive(path):
                finished.append(path)
                seen.discard(key)  # its offset goes with it (below), before the file does
                finished_at[path] = (key, end)
        rings = self._read_rings(names, batch, finished)
        if self._first_run:
            self._first_run = False
            if batch:
                batch = self._drop_chained(batch)
        if batch:
            batch.sort(key=_first)  # by time; stable: one worker's records keep their order
            self.log.append_cut(batch)
            self.log.sync()
        # offsets of files gone, and of finished files (removed below): the inode of a removed file
        # can be given to a new spool file at once, which must be read from its start. Saved before
        # the files are removed: a crash in between chains a finished file again (duplicated, not lost)
        for key in [k for k in offsets if k not in seen]:
            del offsets[key]
        if offsets != self._saved:
            self._save_offsets()
        for ring, total, seq in rings:  # chained: the worker may store over them
            if total != ring.chained():
                ring.set_position(total, seq)
            overflow = spooled.get(ring.path.name[:-len(".ring")] + ".jsonl", (0, 0))
            if ring.overflow() != overflow:
                ring.set_overflow(*overflow)
        for path in finished:  # fully chained and nobody writes it any more
            ring = self._rings.pop(path.name, None)
            if ring is not None:
                ring.close()
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError:
                if path in finished_at:  # still there: keep its place, not to chain it again
                    key, end = finished_at[path]
                    offsets[key] = end
        if offsets != self._saved:
            self._save_offsets()
        return len(batch)

    def _drop_chained(self, batch: list[tuple[bytes, bytes, int]]) -> list[tuple[bytes, bytes, int]]:
        """The first batch after a start without the records that end the log already.

        A chainer killed after appending a batch but before saving how far it read (an fsync lies in
        between) left that batch to be read again: it is the end of the log, and at most as long as
        this batch. Its records are known by their ids (random, 128 bits), so they are not chained twice."""
        chained = self.log.last_record_ids(len(batch))
        if not chained:
            return batch
        kept = []
        for item in batch:
            try:
                record_id = orjson.loads(item[1])["id"]
            except (ValueError, TypeError, KeyError):
                record_id = None
            if record_id not in chained:
                kept.append(item)
        if len(kept) < len(batch):
            log.warning("audit chainer: %d spooled records were in the log already (chained before a crash, "
                        "not chained again)", len(batch) - len(kept))
        return kept

    def _read_rings(self, names: list[str], batch: list[tuple[bytes, bytes, int]],
                    finished: list[Path]) -> list[tuple[SpoolRing, int, int]]:
        """Add the new records of every ring (of the folder's `names`) to `batch`; (ring, bytes,
        seq) after them."""
        found: list[tuple[SpoolRing, int, int]] = []
        rings = sorted(name for name in names if name.endswith(".ring"))
        bad: list[bytes] = []
        for name in rings:
            ring = self._rings.get(name)
            before = len(batch)
            try:
                if ring is None:
                    ring = SpoolRing.open(self.dir / name)
                    if ring is None:
                        continue  # not a ring (yet): its worker makes it under another name first
                    self._rings[name] = ring
                _records, total, seq = ring.frames(batch, bad)  # keyed into the batch: (time, record, cut)
            except (OSError, ValueError) as exc:
                del batch[before:]
                self.log._failed(ValueError(f"{name}: {exc}"))
                continue
            taken = len(batch) - before + len(bad)
            for record in bad:
                self.log._failed(ValueError(f"{name}: not an audit record: {record[:80]!r}"))
            bad.clear()
            found.append((ring, total, seq))
            if not taken and not _writer_alive(ring.path):
                finished.append(ring.path)  # its worker is gone and everything it stored is chained
        current = set(rings)
        for name in [n for n in self._rings if n not in current]:
            self._rings.pop(name).close()
        for name in names:  # a ring being made by a worker that died doing it: <pid>.ring.<maker>.tmp
            if name.endswith(".tmp") and ".ring." in name:
                maker = name.split(".")[-2]
                path = self.dir / name
                if maker.isdigit() and not _writer_alive(path.with_name(f"{maker}.ring")):
                    with contextlib.suppress(OSError):
                        os.unlink(path)
        return found

    # How far each spool file is chained survives a restart: two slots of one file, written in
    # turn in place (one pwrite, no new file and rename every 100 ms), each with a generation and
    # a checksum; the valid one of the higher generation counts. A write torn by a crash leaves
    # the other slot, the state before: what a crash between chaining and saving gives anyway.

    def _load_offsets(self) -> dict[str, int]:
        best: tuple[int, dict[str, int]] | None = None
        try:
            with open(self.offsets_path, "rb") as f:
                for slot in range(2):
                    f.seek(slot * OFFSETS_SLOT)
                    header = f.readline(200)
                    try:
                        magic, generation, length, digest = header.split()
                        body = f.read(int(length))
                        if magic != b"ppoffsets1" or hashlib.sha256(body).hexdigest().encode() != digest:
                            continue
                        state = {k: int(v) for k, v in orjson.loads(body).items()}
                    except (ValueError, TypeError, AttributeError):
                        continue
                    if best is None or int(generation) > best[0]:
                        best = (int(generation), state)
        except FileNotFoundError:
            pass
        if best is None:
            try:  # offsets kept by an older version
                legacy = {k: int(v) for k, v in orjson.loads(self.legacy_offsets_path.read_bytes()).items()}
            except (OSError, ValueError):
                legacy = {}
            best = (0, legacy)
        self._generation = best[0]
        self._saved = dict(best[1])
        return best[1]

    def _save_offsets(self) -> None:
        assert self._offsets is not None
        body = orjson.dumps(self._offsets)
        header = b"ppoffsets1 %d %d %s\n" % (self._generation + 1, len(body), hashlib.sha256(body).hexdigest().encode())
        if len(header) + len(body) > OFFSETS_SLOT:
            raise ValueError(f"{len(self._offsets)} spool files: too many to keep their offsets")
        if self._offsets_fd is None:
            self._offsets_fd = os.open(self.offsets_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._generation += 1
        os.pwrite(self._offsets_fd, header + body, (self._generation % 2) * OFFSETS_SLOT)
        self._saved = dict(self._offsets)
        if self.legacy_offsets_path.exists():
            with contextlib.suppress(OSError):
                os.unlink(self.legacy_offsets_path)


_first = operator.itemgetter(0)


def _writer_alive(path: Path) -> bool:
    """Is the worker that writes this spool file still writing it? (<pid>.jsonl or <pid>.ring of a live pid)"""
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
