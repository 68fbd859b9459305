"""The usage store: decisions counted into SQLite for `policyplug report`.

Counts are kept per hour, kind, direction, decision, deciding rule, sender domain and recipient
domain, plus per-user message counts, plus per-tag counts (table `tag_traffic`: a decision counts
once under each of its `tag "LABEL"`s, and not at all there without one). `count` only adds to an
in-memory tally; the tally is written in one transaction every `flush_interval` seconds (or 5,000
distinct rows), so a decision costs a dictionary update, not a disk write. With `background=True`
(the decision service) a thread of its own writes it: a commit waits for the disk (5-15 ms here),
and the service's event loop must not.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

log = logging.getLogger("policyplug.usage")

PAGE_CACHE_KIB = 512  # the SQLite store's page cache (PRAGMA cache_size)

SCHEMA = """
CREATE TABLE IF NOT EXISTS traffic (
    hour TEXT NOT NULL, kind TEXT NOT NULL, direction TEXT NOT NULL, decision TEXT NOT NULL,
    rule TEXT NOT NULL, sender_domain TEXT NOT NULL, recipient_domain TEXT NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (hour, kind, direction, decision, rule, sender_domain, recipient_domain)
);
CREATE TABLE IF NOT EXISTS user_messages (
    hour TEXT NOT NULL, user TEXT NOT NULL, direction TEXT NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (hour, user, direction)
);
CREATE INDEX IF NOT EXISTS traffic_hour ON traffic (hour);
-- added after the first two: IF NOT EXISTS makes a store written by an older version gain it on open
CREATE TABLE IF NOT EXISTS tag_traffic (
    hour TEXT NOT NULL, tag TEXT NOT NULL, kind TEXT NOT NULL, direction TEXT NOT NULL, decision TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (hour, tag, kind, direction, decision)
);
"""


# Payloads that mark a bodiless message as a typing notification: XEP-0085 chat states, and SIP's
# isComposing (RFC 3994), whose Content-Type the Kamailio adapter puts in `payload`
CHAT_STATE_PAYLOADS = frozenset({"http://jabber.org/protocol/chatstates", "application/im-iscomposing+xml"})


def traffic_kind(event: Any) -> str:
    """The kind a decision is counted under (docs/reports.md): a message's error bounce
    (`type` "error", e.g. a server's failed-delivery reply "from" the remote user) and a message
    carrying only a chat state are counted apart from messages people wrote, as
    `message-error` / `message-chatstate` (`groupchat-...` likewise), and not as a user's messages."""
    kind = event.kind
    if kind == "message" or kind == "groupchat":
        if event.type == "error":
            return kind + "-error"
        if not event.body and not event.subject and not CHAT_STATE_PAYLOADS.isdisjoint(event.payload):
            return kind + "-chatstate"
    return kind


class UsageStore:
    def __init__(self, path: str | Path, flush_interval: float = 1.0, background: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False)
        self._db.executescript(SCHEMA)
        # SQLite's page cache is 2 MiB per connection by default; a batch a second touches only the
        # current hour's pages, so 512 KiB holds them, and a long-running service's memory settles sooner
        self._db.execute(f"PRAGMA cache_size = -{PAGE_CACHE_KIB}")
        self._start_tally(flush_interval, background, "policyplug-usage")

    def _start_tally(self, flush_interval: float, background: bool, thread_name: str) -> None:
        """The tally every backend keeps between writes, and its writer thread when `background`."""
        self.flush_interval = flush_interval
        self._traffic: Counter[tuple[str, ...]] = Counter()
        self._users: Counter[tuple[str, str, str]] = Counter()
        self._tags: Counter[tuple[str, str, str, str, str]] = Counter()
        self._lock = threading.Lock()
        self._last_flush = time.monotonic()
        self.errors = 0
        self.last_error: str | None = None
        self._write_lock = threading.Lock()  # one batch at a time, in order (the thread's, close's)
        self._wake = threading.Event()
        self._closing = False
        self._writer: threading.Thread | None = None
        if background:
            self._writer = threading.Thread(target=self._run, name=thread_name, daemon=True)
            self._writer.start()

    def count(self, event: Any, decision: Any, direction: str) -> None:
        hour = event.time.strftime("%Y-%m-%dT%H:00Z")
        kind = traffic_kind(event)
        key = (
            hour,
            kind,
            direction,
            decision.decision,
            decision.rule or "default",
            event.sender.domain,
            event.recipient.domain,
        )
        # _tags, not .tags: the property makes a list for every decision without any; the engine
        # leaves None or a shared tuple without repeats, dict.fromkeys guards hand-built decisions
        tags = decision._tags
        with self._lock:
            self._traffic[key] += 1
            if tags:
                for tag in dict.fromkeys(tags):
                    self._tags[(hour, tag, kind, direction, decision.decision)] += 1
            if (kind == "message" or kind == "groupchat") and event.sender.user:
                self._users[(hour, event.sender.address, direction)] += 1
            due = time.monotonic() - self._last_flush >= self.flush_interval or len(self._traffic) > 5000
        if due:
            self.flush()

    def flush(self) -> None:
        """Write the tally: now, or (with a writer thread) by waking the thread."""
        if self._writer is not None and not self._closing:
            self._last_flush = time.monotonic()
            self._wake.set()
            return
        self._drain()

    def _take(self) -> tuple[Counter[Any], Counter[Any], Counter[Any]]:
        """The tally so far (traffic, users, tags), leaving an empty one; the caller holds _write_lock."""
        with self._lock:
            taken = self._traffic, self._users, self._tags
            self._traffic, self._users, self._tags = Counter(), Counter(), Counter()
            self._last_flush = time.monotonic()
        return taken

    def _drain(self) -> None:
        with self._write_lock:
            traffic, users, tags = self._take()
            if not traffic and not users and not tags:
                return
            self._write(traffic, users, tags)

    def _run(self) -> None:
        """The writer thread: a batch each flush interval or when count() finds one due; close()
        writes the last."""
        while not self._closing:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            if not self._closing:
                self._drain()

    def _write(
        self,
        traffic: Counter[tuple[str, ...]],
        users: Counter[tuple[str, str, str]],
        tags: Counter[tuple[str, str, str, str, str]],
    ) -> None:
        """Add one batch of counts to the database (a backend's own; policyplug.usage.postgres_store)."""
        try:
            with self._db:
                self._db.executemany(
                    "INSERT INTO traffic VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET count = count + excluded.count",
                    [(*key, n) for key, n in traffic.items()],
                )
                self._db.executemany(
                    "INSERT INTO user_messages VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE SET count = count + excluded.count",
                    [(*key, n) for key, n in users.items()],
                )
                self._db.executemany(
                    "INSERT INTO tag_traffic VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET count = count + excluded.count",
                    [(*key, n) for key, n in tags.items()],
                )
        except sqlite3.Error as exc:
            # a full disk must not stop decisions: the batch is lost, counted and logged
            self.errors += 1
            self.last_error = str(exc)
            log.error("usage store %s: %s", self.path, exc)

    def close(self) -> None:
        self._closing = True
        if self._writer is not None:
            self._wake.set()
            self._writer.join(timeout=30)
        try:
            self._drain()  # what came after the thread's last batch
        finally:
            self._db.close()
