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
and the record's canonical JSON is put together from already-serialised parts (`record_body`), byte
for byte what `canonical(build_record(...))` gives. A failing disk is counted and reported in
`stats`, and decisions go on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("policyplug.audit")

LEVELS = ("all", "denied", "none")
GENESIS = "0" * 64
FORMAT_VERSION = 1
# seconds between hand-overs to the writer: 5 ms batches cost less CPU than 2 ms ones (fewer GIL hand-offs
# and thread wake-ups) and hold the GIL ~0.5 ms at 20,000 records/s, well inside a 2 ms p99
BATCH_INTERVAL = 0.005
_SORTED = orjson.OPT_SORT_KEYS
# The writer gives up the GIL and the CPU every YIELD_EVERY records (~150 µs of work): on a busy core
# the deciding thread runs in between instead of waiting for the batch to end (or for the 5 ms GIL
# switch interval). os.sched_yield releases the GIL around the system call.
YIELD_EVERY = 32
_yield = getattr(os, "sched_yield", lambda: time.sleep(0))


def canonical(record: dict[str, Any]) -> bytes:
    """The bytes that are hashed: sorted keys, no spaces, UTF-8 (orjson: 7x faster than json here)."""
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


def record_hash(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


def build_record(event: Any, decision: Any, *, node: str, include_bodies: bool, record_id: str | None = None,
                 time: str | None = None) -> dict[str, Any]:
    """An audit record (docs/audit.md) without its chain fields (`seq`, `prev`, `hash`).

    `record_id` defaults to a random 128-bit hex id, `time` to now (ISO 8601, UTC).
    """
    event_json = event_record(event, include_bodies)
    decision_json = decision.to_json()
    return {
        "v": FORMAT_VERSION, "id": record_id or uuid.uuid4().hex,
        "time": time or datetime.now(UTC).isoformat(), "node": node,
        "policy": decision_json.pop("policy"), "policy_revision": decision_json.pop("policy_revision"),
        "event": event_json, "decision": decision_json,
    }


def shift_rotations(path: Path) -> None:
    """Rotate by renaming: audit.jsonl.N -> .N+1, ..., audit.jsonl -> audit.jsonl.1."""
    index = 1
    while path.with_name(f"{path.name}.{index}").exists():
        index += 1
    for i in range(index, 1, -1):
        os.replace(path.with_name(f"{path.name}.{i - 1}"), path.with_name(f"{path.name}.{i}"))
    os.replace(path, path.with_name(f"{path.name}.1"))


def event_record(event: Any, include_bodies: bool) -> dict[str, Any]:
    """The event as recorded: its JSON, without body and subject unless bodies are kept."""
    event_json = event.to_json()
    if not include_bodies:
        event_json.pop("body", None)
        event_json.pop("subject", None)
    return event_json


_EVENT_KEYS = frozenset(("kind", "from", "to", "body", "time", "protocol", "client", "headers", "payload", "type",
                         "subject", "size"))


def encode_event(event: Any, include_bodies: bool) -> bytes:
    """Canonical JSON of `event_record(event, include_bodies)`, built from the event's attributes
    (3x cheaper than Event.to_json + dumps: no intermediate copies, orjson formats the time). Falls
    back to Event.to_json if that ever gains or loses a member (checked once, at import)."""
    if not _FAST_EVENT:
        return orjson.dumps(event_record(event, include_bodies), option=_SORTED)
    members = {
        "kind": event.kind, "from": event.sender.raw, "to": event.recipient.raw, "time": event.time,
        "protocol": event.protocol, "client": event.client, "headers": event.headers, "payload": event.payload,
        "type": event.type, "size": event.size,
    }
    if include_bodies:
        members["body"] = event.body
        members["subject"] = event.subject
    if event.content_complete is not True:  # as Event.to_json: only when false
        members["content_complete"] = False
    return orjson.dumps(members, option=_SORTED | orjson.OPT_UTC_Z)


def _fast_event_matches() -> bool:
    from ..events import Event  # late: the event module must not depend on the audit log
    try:
        return set(Event.message("a@b.example", "c@d.example").to_json()) == _EVENT_KEYS
    except Exception:  # pragma: no cover - whatever changed, the slow path is right
        return False


def encode_decision(decision: Any) -> tuple[bytes, str, str]:
    """(canonical JSON of the decision without its policy fields, policy name, policy revision).

    The bytes are the record's `decision` member; a transport may answer with them too (see
    `policyplug.service.socket_transport`), so a decision is serialised once.
    """
    shape = decision.shape()
    if shape is not None:
        encoded = _ENCODED_DECISIONS.get(shape)
        if encoded is not None:
            return encoded
    decision_json = decision.to_json()
    policy = decision_json.pop("policy")
    revision = decision_json.pop("policy_revision")
    encoded = orjson.dumps(decision_json, option=_SORTED), policy, revision
    if shape is not None:
        if len(_ENCODED_DECISIONS) >= ENCODED_DECISIONS_LIMIT:
            _ENCODED_DECISIONS.clear()
        _ENCODED_DECISIONS[shape] = encoded
    return encoded


# A policy makes few distinct decisions (one per rule and obligation set): their serialisations,
# by Decision.shape(), so the service does not serialise the same answer 20,000 times a second.
ENCODED_DECISIONS_LIMIT = 4096
_ENCODED_DECISIONS: dict[tuple[Any, ...], tuple[bytes, str, str]] = {}


def record_body(*, decision: bytes, event: bytes, record_id: str, node: str, policy: str, revision: str,
                prev: str, seq: int, time: str) -> bytes:
    """The canonical JSON of a record without `hash`, from serialised parts (`decision` and `event`
    canonical, i.e. orjson with sorted keys): the members in sorted key order, as `canonical` does."""
    return b"".join((
        b'{"decision":', decision, b',"event":', event, b',"id":', orjson.dumps(record_id),
        b',"node":', orjson.dumps(node), policy_part(policy, revision), b',"prev":', orjson.dumps(prev),
        b',"seq":', str(seq).encode(), b',"time":', orjson.dumps(time), b',"v":', str(FORMAT_VERSION).encode(),
        b"}",
    ))


_FAST_EVENT = _fast_event_matches()


def should_audit(level: str, decision: Any) -> bool:
    """`denied` (default): refusals and drops, and every decision a rule marked `audit`; `all`:
    every decision; `none`: only those a rule marked `audit` (rule-language.md: the clause writes
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


def policy_part(policy: str, revision: str) -> bytes:
    """The record's `policy` and `policy_revision` members, serialised (between `node` and `prev`)."""
    return b',"policy":' + orjson.dumps(policy) + b',"policy_revision":' + orjson.dumps(revision)


# What the writer queues per record: (event, decision, policy part), each already serialised canonically
# (`encode_event`, `encode_decision`, `policy_part`).
QueuedRecord = tuple[bytes, bytes, bytes]


class ChainedLog:
    """The file side of an audit log: chains queued records, appends them, fsyncs, rotates.

    Used by one writer at a time (the thread of `AuditWriter`). Errors are counted in `stats` and
    logged, never raised: a failing disk must not stop the caller, and the next batch tries to reopen
    the file (disk freed, permissions fixed).
    """

    def __init__(self, path: Path, *, node: str, max_bytes: int | None = None, flush_interval: float = 0.2,
                 stats: dict[str, Any] | None = None):
        self.path = path
        self.node = node
        self.max_bytes = max_bytes
        self.flush_interval = flush_interval
        self.stats = stats if stats is not None else {"written": 0, "errors": 0, "syncs": 0, "last_error": None}
        self._file: Any = None
        self._prev, self._seq = GENESIS, 0
        self._last_sync = time.monotonic()
        self._opened = False

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._prev, self._seq = last_record(self.path)
        if self._prev == GENESIS:
            rotated = self.path.with_name(self.path.name + ".1")
            if rotated.exists():
                self._prev, self._seq = last_record(rotated)
        self._file = self.path.open("ab")
        self._opened = True

    def append(self, items: list[QueuedRecord]) -> None:
        try:
            if not self._opened:
                self._open()
            # one time and one batch of random ids per batch: "time" is when the record was written
            now = orjson.dumps(datetime.now(UTC).isoformat())
            ids = os.urandom(16 * len(items)).hex().encode()
            node = b',"node":' + orjson.dumps(self.node)
            tail = b',"time":' + now + b',"v":' + str(FORMAT_VERSION).encode() + b"}"
            prev = self._prev.encode()
            seq = self._seq
            sha256 = hashlib.sha256
            lines = []
            for index, (event, decision, policy) in enumerate(items):
                seq += 1
                # record_body(), inlined: the members in sorted key order, as canonical() puts them
                body = b"".join((
                    b'{"decision":', decision,
                    b',"event":', event,
                    b',"id":"', ids[32 * index:32 * index + 32], b'"', node, policy,
                    b',"prev":"', prev, b'","seq":', str(seq).encode(), tail,
                ))
                prev = sha256(body).hexdigest().encode()
                # the line is the hashed body with "hash" put first: one serialisation per record
                lines.append(b'{"hash":"' + prev + b'",' + body[1:] + b"\n")
                if len(lines) == YIELD_EVERY:
                    self._append_lines(lines, seq, prev)
                    lines = []
                    _yield()  # let a waiting decision in: it must not wait behind a whole batch
            if lines:
                self._append_lines(lines, seq, prev)
            self.sync_if_due()
            if self.max_bytes is not None and self._file.tell() >= self.max_bytes:
                self._rotate()
        except Exception as exc:
            self.failed(exc)
            self._opened = False  # try to reopen next time

    def _append_lines(self, lines: list[bytes], seq: int, prev: bytes) -> None:
        """Append chained lines, YIELD_EVERY at most per write: one write() of a whole batch could spend
        milliseconds in the kernel filling new page-cache pages (seen on this project's VM, whose kernel
        does not preempt kernel code) while a decision at the same priority waited for it. The chain
        head moves with what is written, so a write that fails leaves it at the last line on disk."""
        self._file.write(b"".join(lines))
        self._file.flush()
        self._seq, self._prev = seq, prev.decode()
        self.stats["written"] += len(lines)

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
            self.sync_if_due(force=True)
            self._file.close()
            self._file = None
        self._opened = False


class AuditWriter:
    """Queue audited decisions and append them to a hash-chained JSON Lines file (a writer thread)."""

    def __init__(self, path: str | Path, *, level: str = "denied", include_bodies: bool = False,
                 node: str | None = None, max_bytes: int | None = None, flush_interval: float = 0.2,
                 background: bool = True, queue_size: int = 100_000):
        if level not in LEVELS:
            raise ValueError(f"audit level must be one of {', '.join(LEVELS)}")
        self.path = Path(str(path).replace("{pid}", str(os.getpid())))
        self.level = level
        self.include_bodies = include_bodies
        self.node = node or socket.gethostname()
        self.max_bytes = max_bytes
        self.flush_interval = flush_interval
        self.background = background
        self.stats: dict[str, Any] = {"written": 0, "dropped": 0, "errors": 0, "syncs": 0, "last_error": None}
        self._log = ChainedLog(self.path, node=self.node, max_bytes=max_bytes, flush_interval=flush_interval,
                               stats=self.stats)
        self._pending: deque[QueuedRecord] = deque()
        self._queue_size = queue_size
        self._policy_parts: dict[tuple[str, str], bytes] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

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
            pending.append((encode_event(event, self.include_bodies), decision_bytes, part))  # atomic under the GIL
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
