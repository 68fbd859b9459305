"""The SQLite usage store with a writer thread (the decision service's): `count` never waits for the disk,
and every count still reaches the database, at each flush interval and at close."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from policyplug import Event, load_policy
from policyplug.usage.backends import open_usage_store
from policyplug.usage.store import UsageStore

POLICY = load_policy(
    text='policy "u"\nlocal domains ["acme.example"]\ndefault allow\nrule r:\n  when kind == "presence"\n  deny\n'
)


def rows(db: Path) -> int:
    with sqlite3.connect(db) as connection:
        return connection.execute("SELECT coalesce(sum(count), 0) FROM traffic").fetchone()[0]


def count(store: UsageStore, n: int) -> None:
    for i in range(n):
        event = Event.message(f"u{i % 7}@acme.example", "b@x.example", time="2026-11-24T10:15:00Z")
        store.count(event, POLICY.decide(event), "outbound")


def test_counts_are_written_by_the_thread_and_at_close(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    store = open_usage_store(db, flush_interval=0.05)  # the service's: background=True
    assert isinstance(store, UsageStore) and store._writer is not None
    count(store, 500)
    deadline = time.monotonic() + 10
    while rows(db) < 500:  # written by the thread at its interval, with no further count
        assert time.monotonic() < deadline, rows(db)
        time.sleep(0.02)
    count(store, 123)
    store.close()  # the rest, at once
    assert rows(db) == 623 and not store._writer.is_alive()


def test_count_does_not_wait_for_a_slow_write(tmp_path: Path) -> None:
    """A commit that takes long (a slow disk) holds up the writer thread, never the caller of count."""
    store = UsageStore(tmp_path / "usage.db", flush_interval=0.01, background=True)
    release = threading.Event()
    writes: list[int] = []
    real_write = store._write

    def slow_write(*batch: object) -> None:
        release.wait(10)
        writes.append(1)
        real_write(*batch)  # type: ignore[arg-type]

    store._write = slow_write  # type: ignore[method-assign]
    try:
        count(store, 10)
        time.sleep(0.05)  # the thread is now inside slow_write
        started = time.perf_counter()
        count(store, 2_000)  # due many times over: each only wakes the thread
        assert time.perf_counter() - started < 5, "count waited for the write"
        assert not writes
    finally:
        release.set()
        store.close()
    assert rows(tmp_path / "usage.db") == 2_010


def test_inline_store_writes_in_the_callers_thread(tmp_path: Path) -> None:
    """background=False (a Kamailio worker: no thread runs between requests) writes in count, as before."""
    db = tmp_path / "usage.db"
    store = open_usage_store(db, flush_interval=0.0, background=False)
    assert store._writer is None
    count(store, 3)
    assert rows(db) == 3  # written in count, no close needed
    store.close()
