"""The audit log: JSON Lines, one record per audited decision, hash-chained.

Each record carries `prev`, the SHA-256 of the previous record's line, and `hash`, the SHA-256
of its own canonical JSON without `hash`. Editing, deleting or reordering a line breaks the
chain, and `policyplug audit verify` names the first record where it breaks. The chain goes
on across rotated files (the first record of a new file points at the last of the old one).

Writing never blocks a decision: `submit` appends the record to a pending list (bounded; a
full list counts a drop) and a writer thread takes the whole list every few milliseconds,
appends it and fsyncs at least every `flush_interval` seconds and on close. Handing records
over in batches, without waking the writer per record, keeps the decision thread fast. A failing disk is counted and reported in `stats`, and decisions go on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("policyplug.audit")

LEVELS = ("all", "denied", "none")
GENESIS = "0" * 64
FORMAT_VERSION = 1
BATCH_INTERVAL = 0.01  # seconds between hand-overs to the writer thread


def canonical(record: dict[str, Any]) -> bytes:
    """The bytes that are hashed: sorted keys, no spaces, UTF-8 (orjson: 7x faster than json here)."""
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


def record_hash(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


def should_audit(level: str, decision: Any) -> bool:
    """`denied` (default): refusals and drops, and every decision a rule marked `audit`."""
    if level == "none":
        return False
    if level == "all":
        return True
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


class AuditWriter:
    """Queue audited decisions and append them to a hash-chained JSON Lines file."""

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
        self.stats: dict[str, Any] = {"written": 0, "dropped": 0, "errors": 0, "last_error": None}
        self._pending: list[dict[str, Any]] = []
        self._queue_size = queue_size
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._file: Any = None
        self._prev, self._seq = GENESIS, 0
        self._last_sync = time.monotonic()
        self._closed = False
        self._opened = False

    # -- the caller's side: cheap, never raises --------------------------------------------------

    def submit(self, event: Any, decision: Any) -> None:
        if self._closed or not should_audit(self.level, decision):
            return
        try:
            record = self._record(event, decision)
            if self.background:
                if self._thread is None:
                    self._start()  # lazily, so a writer created before fork works in the child
                if len(self._pending) >= self._queue_size:
                    self.stats["dropped"] += 1  # the disk cannot keep up: count, never block
                    return
                self._pending.append(record)  # atomic under the GIL
            else:
                with self._lock:
                    self._write([record])
        except Exception as exc:  # never let auditing break a decision
            self._failed(exc)

    def _record(self, event: Any, decision: Any) -> dict[str, Any]:
        event_json = event.to_json()
        if not self.include_bodies:
            event_json.pop("body", None)
            event_json.pop("subject", None)
        decision_json = decision.to_json()
        return {
            "v": FORMAT_VERSION, "id": uuid.uuid4().hex, "time": datetime.now(UTC).isoformat(),
            "node": self.node, "policy": decision_json.pop("policy"),
            "policy_revision": decision_json.pop("policy_revision"),
            "event": event_json, "decision": decision_json,
        }

    # -- the writer's side ------------------------------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="policyplug-audit", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(BATCH_INTERVAL)
            batch, self._pending = self._pending, []
            with self._lock:
                if batch:
                    self._write(batch)
                self._sync_if_due(force=stopping)
            if stopping and not self._pending:
                return

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._prev, self._seq = last_record(self.path)
        if self._prev == GENESIS:
            rotated = self.path.with_name(self.path.name + ".1")
            if rotated.exists():
                self._prev, self._seq = last_record(rotated)
        self._file = self.path.open("ab")
        self._opened = True

    def _write(self, records: list[dict[str, Any]]) -> None:
        try:
            if not self._opened:
                self._open()
            lines = []
            for record in records:
                self._seq += 1
                record["seq"] = self._seq
                record["prev"] = self._prev
                body = canonical(record)
                digest = hashlib.sha256(body).hexdigest()
                self._prev = digest
                # the line is the hashed body with "hash" put first: one serialisation per record
                lines.append(b'{"hash":"' + digest.encode() + b'",' + body[1:] + b"\n")
            self._file.write(b"".join(lines))
            self._file.flush()
            self.stats["written"] += len(records)
            self._sync_if_due()
            if self.max_bytes is not None and self._file.tell() >= self.max_bytes:
                self._rotate()
        except Exception as exc:
            self._failed(exc)
            self._opened = False  # try to reopen next time (disk freed, permissions fixed)

    def _sync_if_due(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._file is not None and (force or now - self._last_sync >= self.flush_interval):
            try:
                os.fsync(self._file.fileno())
            except (OSError, ValueError) as exc:
                self._failed(exc)
            self._last_sync = now

    def _rotate(self) -> None:
        """audit.jsonl -> audit.jsonl.1 -> .2 ...; the chain continues in the new file."""
        os.fsync(self._file.fileno())
        self._file.close()
        index = 1
        while self.path.with_name(f"{self.path.name}.{index}").exists():
            index += 1
        for i in range(index, 1, -1):
            os.replace(self.path.with_name(f"{self.path.name}.{i - 1}"), self.path.with_name(f"{self.path.name}.{i}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._file = self.path.open("ab")

    def _failed(self, exc: BaseException) -> None:
        self.stats["errors"] += 1
        self.stats["last_error"] = f"{type(exc).__name__}: {exc}"
        log.error("audit log %s: %s", self.path, self.stats["last_error"])

    def close(self) -> None:
        """Flush everything queued, fsync, close."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
        with self._lock:
            if self._file is not None:
                self._sync_if_due(force=True)
                self._file.close()
                self._file = None
