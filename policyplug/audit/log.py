"""The audit log: JSON Lines, one record per audited decision, hash-chained.

Each record carries `prev`, the SHA-256 of the previous record's line, and `hash`, the SHA-256
of its own canonical JSON without `hash`. Editing, deleting or reordering a line breaks the
chain, and `policyplug audit verify` names the first record where it breaks. The chain goes
on across rotated files (the first record of a new file points at the last of the old one).

Writing never blocks a decision: `submit` appends the serialised event and decision to a pending
queue (bounded; a full queue counts a drop) and a writer thread takes the whole queue every few
milliseconds, builds the records, chains them, appends them and fsyncs at least every
`flush_interval` seconds and on close. The decision thread does as little as it can: the decision
JSON it serialises for its answer is the same bytes that go into the record (`encode_decision`),
and the record is put together from already-serialised parts and chained by record.py's `chain`
(the one chaining function of every writer), byte for byte what `canonical(build_record(...))`
gives. A failing disk is counted and reported in `stats`, and decisions go on. On start a torn last
line (a crash in the middle of a write) is cut and a `repair` record says what was cut; with a
sealing key (seal.py) the writer seals the chain every interval.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from .record import (  # noqa: F401 - the names other writers and tests take from here (docs/audit.md)
    _ENCODED_DECISIONS,
    ENCODED_DECISIONS_LIMIT,
    FORMAT_VERSION,
    GENESIS,
    build_record,
    canonical,
    chain,
    decision_head,
    encode_decision,
    encode_event,
    event_record,
    mark_parts,
    now_iso,
    policy_part,
    record_body,
    record_hash,
    tail_part,
)

log = logging.getLogger("policyplug.audit")

LEVELS = ("all", "denied", "none")
# seconds between hand-overs to the writer: 5 ms batches cost less CPU than 2 ms ones (fewer GIL hand-offs
# and thread wake-ups) and hold the GIL ~0.5 ms at 20,000 records/s, well inside a 2 ms p99
BATCH_INTERVAL = 0.005
# The writer gives up the GIL and the CPU every YIELD_EVERY records (~150 µs of work): on a busy core
# the deciding thread runs in between instead of waiting for the batch to end (or for the 5 ms GIL
# switch interval). os.sched_yield releases the GIL around the system call.
YIELD_EVERY = 32
_yield = getattr(os, "sched_yield", lambda: time.sleep(0))


def shift_rotations(path: Path) -> None:
    """Rotate by renaming: audit.jsonl.N -> .N+1, ..., audit.jsonl -> audit.jsonl.1."""
    index = 1
    while path.with_name(f"{path.name}.{index}").exists():
        index += 1
    for i in range(index, 1, -1):
        os.replace(path.with_name(f"{path.name}.{i - 1}"), path.with_name(f"{path.name}.{i}"))
    os.replace(path, path.with_name(f"{path.name}.1"))


def should_audit(level: str, decision: Any) -> bool:
    """`denied` (default): refusals and drops, and every decision a rule marked `audit`; `all`:
    every decision; `none`: only those a rule marked `audit` (docs/audit.md: the clause writes
    the decision "even where the audit level would not"; no --audit-log means no records at all)."""
    if level == "all":
        return True
    if level == "none":
        return decision.audit
    return decision.audit or decision.decision in ("deny", "drop")


def last_record(path: Path) -> tuple[str, int]:
    """(hash, seq) of the last complete record of an audit file, to continue its chain."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - (1 << 20)))  # the last MiB holds the last record
            tail = f.read().splitlines()
    except FileNotFoundError:
        return GENESIS, 0
    for line in reversed(tail):
        try:
            record = orjson.loads(line)
            return record["hash"], int(record["seq"])
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line from a crash: the chain continues from the one before
    return GENESIS, 0


def chain_head(path: Path) -> tuple[str, int]:
    """Where a writer continues the chain: the last record of `path`, or of `path.1` when `path` is new."""
    prev, seq = last_record(path)
    if prev == GENESIS:
        rotated = path.with_name(path.name + ".1")
        if rotated.exists():
            prev, seq = last_record(rotated)
    return prev, seq


def cut_torn_tail(path: Path) -> dict[str, Any] | None:
    """Cut what follows the last newline of `path` (a line a crash left half written) and return the
    `repair` mark that records it (docs/audit.md): the length and SHA-256 of the bytes cut. The file
    is fsynced after the cut, so the repair record that follows is never appended to torn bytes."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return None
        position, keep = size, 0
        while position > 0:  # back to the last newline (a torn line is short, but read in steps)
            step = min(position, 1 << 16)
            position -= step
            newline = os.pread(fd, step, position).rfind(b"\n")
            if newline >= 0:
                keep = position + newline + 1
                break
        digest = hashlib.sha256()
        at = keep
        while at < size:
            chunk = os.pread(fd, min(1 << 20, size - at), at)
            digest.update(chunk)
            at += len(chunk)
        os.ftruncate(fd, keep)
        os.fsync(fd)
    finally:
        os.close(fd)
    log.warning(
        "audit log %s: cut a torn last line (%d bytes) left by a crash; a repair record says so",
        path,
        size - keep,
    )
    return {"bytes": size - keep, "kind": "repair", "offset": keep, "sha256": digest.hexdigest()}


# What the writer queues per record: (event, decision, policy part), each already serialised canonically
# (`encode_event`, `encode_decision`, `policy_part`).
QueuedRecord = tuple[bytes, bytes, bytes]


class ChainedLog:
    """The file side of an audit log: chains queued records, appends them, fsyncs, rotates, seals.

    Used by one writer at a time (the thread of `AuditWriter`). Errors are counted in `stats` and
    logged, never raised: a failing disk must not stop the caller, and the next batch tries to reopen
    the file (disk freed, permissions fixed).
    """

    def __init__(
        self,
        path: Path,
        *,
        node: str,
        max_bytes: int | None = None,
        flush_interval: float = 0.2,
        stats: dict[str, Any] | None = None,
        sealer: Any = None,
    ):
        self.path = path
        self.node = node
        self.max_bytes = max_bytes
        self.flush_interval = flush_interval
        self.stats: dict[str, Any] = (
            stats if stats is not None else {"written": 0, "errors": 0, "syncs": 0, "last_error": None}
        )
        self.sealer = sealer  # seal.Sealer, or None: not sealed
        self._file: Any = None
        self._prev, self._seq = GENESIS, 0
        self._last_sync = time.monotonic()
        self._opened = False
        self._node_part = b',"node":' + orjson.dumps(node)

    def open(self) -> None:
        """Open now (cutting a torn tail, checking the seal key); errors are counted, and retried later."""
        try:
            if not self._opened:
                self._open()
        except Exception as exc:
            self.failed(exc)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair = cut_torn_tail(self.path)
        self._prev, self._seq = chain_head(self.path)
        self._file = self.path.open("ab")
        self._opened = True
        if repair is not None:
            self._append_marks([repair])
            self.stats["repairs"] = self.stats.get("repairs", 0) + 1
        if self.sealer is not None and not self.sealer.checked:
            self.sealer.check_log([self.path, self.path.with_name(self.path.name + ".1")])

    def _append_marks(self, marks: list[dict[str, Any]]) -> None:
        when = now_iso()
        lines, prev, seq = chain(
            [mark_parts(m, node=self.node, time=when) for m in marks], self._prev.encode(), self._seq
        )
        self._file.write(b"".join(lines))
        self._file.flush()
        self._seq, self._prev = seq, prev.decode()

    def append(self, items: list[QueuedRecord]) -> None:
        try:
            if not self._opened:
                self._open()
            # one time and one batch of random ids per batch: "time" is when the record was written
            tail = tail_part(orjson.dumps(datetime.now(UTC).isoformat()))
            ids = os.urandom(16 * len(items)).hex().encode()
            node = self._node_part
            for start in range(0, len(items), YIELD_EVERY):
                # at most YIELD_EVERY a write, the CPU given up in between: a waiting decision must not
                # wait behind a whole batch
                if start:
                    _yield()
                parts = [
                    (decision_head(decision, event, ids[32 * index : 32 * index + 32], node, policy), tail)
                    for index, (event, decision, policy) in enumerate(
                        items[start : start + YIELD_EVERY], start
                    )
                ]
                self._append_lines(*chain(parts, self._prev.encode(), self._seq))
            if self.sealer is not None:
                self.sealer.unsealed += len(items)
                self.sealer.batch_written(seq=self._seq, hash_=self._prev, log_path=self.path, node=self.node)
            self.sync_if_due()
            if self.max_bytes is not None and self._file.tell() >= self.max_bytes:
                self._rotate()
        except Exception as exc:
            self.failed(exc)
            self._opened = False  # try to reopen next time

    def _append_lines(self, lines: list[bytes], prev: bytes, seq: int) -> None:
        """Append chained lines, YIELD_EVERY at most per write: one write() of a whole batch could spend
        milliseconds in the kernel filling new page-cache pages (seen on this project's VM, whose kernel
        does not preempt kernel code) while a decision at the same priority waited for it. The chain
        head moves with what is written, so a write that fails leaves it at the last line on disk."""
        self._file.write(b"".join(lines))
        self._file.flush()
        self._seq, self._prev = seq, prev.decode()
        self.stats["written"] += len(lines)

    def seal_if_due(self, force: bool = False) -> None:
        """Seal the chain when the interval is up (or `force`, on close) and records came since the
        last seal: the seal record, fsync, then the key advances (seal.py)."""
        sealer = self.sealer
        if sealer is None or not self._opened:
            return
        now = time.monotonic()
        if not (sealer.due(now) or (force and sealer.unsealed)):
            return
        try:
            when = now_iso()
            seq = self._seq + 1
            parts = sealer.seal_parts(prev=self._prev, seq=seq, time=when, node=self.node)
            lines, prev, seq = chain([parts], self._prev.encode(), self._seq)
            self._file.write(lines[0])
            self._file.flush()
            self._seq, self._prev = seq, prev.decode()
            os.fsync(self._file.fileno())
            self.stats["syncs"] += 1
            self._last_sync = now
            sealer.sealed(now, seq=seq, hash_=self._prev, time=when, log_path=self.path, node=self.node)
        except Exception as exc:
            self.failed(exc)

    def sync_if_due(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._file is not None and (force or now - self._last_sync >= self.flush_interval):
            try:
                os.fsync(self._file.fileno())
                self.stats["syncs"] += 1
            except (OSError, ValueError) as exc:
                self.failed(exc)
            self._last_sync = now

    def _rotate(self) -> None:
        """audit.jsonl -> audit.jsonl.1 -> .2 ...; the chain continues in the new file."""
        os.fsync(self._file.fileno())
        self._file.close()
        shift_rotations(self.path)
        self._file = self.path.open("ab")

    def failed(self, exc: BaseException) -> None:
        self.stats["errors"] += 1
        self.stats["last_error"] = f"{type(exc).__name__}: {exc}"
        log.error("audit log %s: %s", self.path, self.stats["last_error"])

    def close(self) -> None:
        if self._file is not None:
            self.seal_if_due(force=True)
            self.sync_if_due(force=True)
            self._file.close()
            self._file = None
        self._opened = False


class AuditWriter:
    """Queue audited decisions and append them to a hash-chained JSON Lines file (a writer thread)."""

    def __init__(
        self,
        path: str | Path,
        *,
        level: str = "denied",
        include_bodies: bool = False,
        node: str | None = None,
        max_bytes: int | None = None,
        flush_interval: float = 0.2,
        background: bool = True,
        queue_size: int = 100_000,
        seal_key: str | Path | None = None,
        seal_interval: float | None = None,
        syslog: str | None = None,
        syslog_batches: bool = False,
    ):
        if level not in LEVELS:
            raise ValueError(f"audit level must be one of {', '.join(LEVELS)}")
        if seal_key is not None and "{pid}" in str(path):
            raise ValueError(
                "a sealed audit log is one chain: a path with {pid} (a chain per process) cannot be "
                "sealed with one key"
            )
        self.path = Path(str(path).replace("{pid}", str(os.getpid())))
        self.level = level
        self.include_bodies = include_bodies
        self.node = node or socket.gethostname()
        self.max_bytes = max_bytes
        self.flush_interval = flush_interval
        self.background = background
        self.stats: dict[str, Any] = {"written": 0, "dropped": 0, "errors": 0, "syncs": 0, "last_error": None}
        self.sealer = None
        if seal_key is not None:
            from .seal import Sealer

            self.sealer = Sealer.from_options(
                seal_key, seal_interval, syslog, hostname=self.node, syslog_batches=syslog_batches
            )
            self.stats["seal"] = self.sealer.stats
        self._log = ChainedLog(
            self.path,
            node=self.node,
            max_bytes=max_bytes,
            flush_interval=flush_interval,
            stats=self.stats,
            sealer=self.sealer,
        )
        self._pending: deque[QueuedRecord] = deque()
        self._queue_size = queue_size
        self._policy_parts: dict[tuple[str, str], bytes] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        if "{pid}" not in str(path) and self.path.exists():
            self._log.open()  # a torn tail is repaired at start, not at the first record

    # -- the caller's side: cheap, never raises --------------------------------------------------

    def submit(self, event: Any, decision: Any) -> None:
        if self._closed or not should_audit(self.level, decision):
            return
        try:
            self._submit(event, *encode_decision(decision))
        except Exception as exc:  # never let auditing break a decision
            self._failed(exc)

    def submit_encoded(self, event: Any, decision: Any, encoded: tuple[bytes, str, str]) -> None:
        """`submit` for a caller that already has `encode_decision(decision)` (for its answer).

        The service's path for every audited decision: the usual case (writer running, queue not
        full) is done here without the calls `_submit` and `_queued` make."""
        if self._closed or (self.level != "all" and not should_audit(self.level, decision)):
            return
        try:
            pending = self._pending
            if self._thread is None or len(pending) >= self._queue_size or not self.background:
                self._submit(event, *encoded)
                return
            decision_bytes, policy, revision = encoded
            part = self._policy_parts.get((policy, revision))
            if part is None:
                part = self._policy_part(policy, revision)
            pending.append(
                (encode_event(event, self.include_bodies), decision_bytes, part)
            )  # atomic under the GIL
        except Exception as exc:
            self._failed(exc)

    def _queued(self, event: Any, decision: bytes, policy: str, revision: str) -> QueuedRecord:
        # Serialised here, not by the writer: a queue of bytes is nothing the garbage collector has to
        # look at, while queued Event objects got promoted to the oldest generation and made every full
        # collection walk thousands of them (tens of ms) when the writer was behind.
        part = self._policy_parts.get((policy, revision))
        if part is None:
            part = self._policy_part(policy, revision)
        return encode_event(event, self.include_bodies), decision, part

    def _policy_part(self, policy: str, revision: str) -> bytes:
        if len(self._policy_parts) > 64:  # one per policy revision served: reloads must not grow it
            self._policy_parts.clear()
        part = self._policy_parts[(policy, revision)] = policy_part(policy, revision)
        return part

    def _submit(self, event: Any, decision: bytes, policy: str, revision: str) -> None:
        item = self._queued(event, decision, policy, revision)
        if self.background:
            if self._thread is None:
                self._start()  # lazily, so a writer created before fork works in the child
            if len(self._pending) >= self._queue_size:
                self.stats["dropped"] += 1  # the disk cannot keep up: count, never block
                return
            self._pending.append(item)  # atomic under the GIL
        else:
            with self._lock:
                self._log.append([item])

    # -- the writer's side ------------------------------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="policyplug-audit", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(BATCH_INTERVAL)
            # popleft, not swapping lists: an append racing with a swap could land in a list already written
            pending = self._pending
            batch = [pending.popleft() for _ in range(len(pending))]
            with self._lock:
                if batch:
                    self._log.append(batch)
                self._log.seal_if_due()
                self._log.sync_if_due(force=stopping)
            if stopping and not self._pending:
                return

    def _failed(self, exc: BaseException) -> None:
        self._log.failed(exc)

    def close(self) -> None:
        """Flush everything queued, fsync, close."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
        with self._lock:
            self._log.close()
