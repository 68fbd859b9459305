"""The usage store in PostgreSQL (`--usage-db postgresql://...`): one store written by every node.

Counting is the SQLite store's (policyplug.usage.store.UsageStore: a tally in memory, per hour,
kind, direction, ...); only the writing differs. Each batch is added with upserts that increment
(`INSERT ... ON CONFLICT DO UPDATE SET count = t.count + excluded.count`), never read-modify-write,
so nodes writing the same rows at once lose no count; rows go in a fixed order so that two
nodes' transactions take their row locks in the same order and cannot deadlock.

Writing happens on a thread of its own: a slow or unreachable PostgreSQL never holds up a
decision. (Where no thread can run between requests, in a Kamailio worker, `background=False`
writes in the deciding thread, at most once a second, and during an outage tries again only after
a pause that doubles up to a minute.) A batch that cannot be written stays in memory and is retried with the next one (up to
MAX_PENDING_ROWS rows; beyond that the oldest counts are dropped, counted and logged), and the
connection is opened again. The schema is migrated on open, under an advisory lock so nodes
starting together migrate once; table `policyplug_schema` records each version applied.

Text columns use the "C" collation, so that ordering and comparisons are bytewise, as in SQLite:
`policyplug report` gives the same report from either store (tests/integration/test_scaling_postgres.py).
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from typing import Any

from .report import Table
from .store import UsageStore

log = logging.getLogger("policyplug.usage")

MAX_PENDING_ROWS = 500_000
ADVISORY_LOCK = 0x706F6C6963797575  # "policyuu": one lock id for every policyplug migration

# (version, what it does, SQL); a version is applied once, in order, and recorded
MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "traffic, user_messages and tag_traffic counts",
        """
CREATE TABLE traffic (
    hour TEXT COLLATE "C" NOT NULL, kind TEXT COLLATE "C" NOT NULL, direction TEXT COLLATE "C" NOT NULL,
    decision TEXT COLLATE "C" NOT NULL, rule TEXT COLLATE "C" NOT NULL, sender_domain TEXT COLLATE "C" NOT NULL,
    recipient_domain TEXT COLLATE "C" NOT NULL, count BIGINT NOT NULL,
    PRIMARY KEY (hour, kind, direction, decision, rule, sender_domain, recipient_domain)
);
CREATE INDEX traffic_hour ON traffic (hour);
CREATE TABLE user_messages (
    hour TEXT COLLATE "C" NOT NULL, "user" TEXT COLLATE "C" NOT NULL, direction TEXT COLLATE "C" NOT NULL,
    count BIGINT NOT NULL,
    PRIMARY KEY (hour, "user", direction)
);
CREATE TABLE tag_traffic (
    hour TEXT COLLATE "C" NOT NULL, tag TEXT COLLATE "C" NOT NULL, kind TEXT COLLATE "C" NOT NULL,
    direction TEXT COLLATE "C" NOT NULL, decision TEXT COLLATE "C" NOT NULL, count BIGINT NOT NULL,
    PRIMARY KEY (hour, tag, kind, direction, decision)
);
""",
    ),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]

UPSERT_TRAFFIC = (
    "INSERT INTO traffic VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT "
    "(hour, kind, direction, decision, rule, sender_domain, recipient_domain) "
    "DO UPDATE SET count = traffic.count + excluded.count"
)
UPSERT_USERS = (
    'INSERT INTO user_messages VALUES (%s, %s, %s, %s) ON CONFLICT (hour, "user", direction) '
    "DO UPDATE SET count = user_messages.count + excluded.count"
)
UPSERT_TAGS = (
    "INSERT INTO tag_traffic VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT "
    "(hour, tag, kind, direction, decision) DO UPDATE SET count = tag_traffic.count + excluded.count"
)


def safe_url(url: str) -> str:
    """The URL without its user and password, for logs and messages (also when it does not parse)."""
    from ..state import redact_url

    return redact_url(url)


def migrate(db: Any) -> int:
    """Bring the schema to SCHEMA_VERSION; the version found before. Several nodes may call it at once."""
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK,))
        db.execute(
            "CREATE TABLE IF NOT EXISTS policyplug_schema (version INTEGER PRIMARY KEY, "
            "description TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        row = db.execute("SELECT max(version) FROM policyplug_schema").fetchone()
        current = row[0] or 0
        if current > SCHEMA_VERSION:
            raise RuntimeError(
                f"the usage store has schema version {current}, newer than this policyplug's "
                f"({SCHEMA_VERSION}): upgrade policyplug"
            )
        for version, description, sql in MIGRATIONS:
            if version > current:
                db.execute(sql)
                db.execute(
                    "INSERT INTO policyplug_schema (version, description) VALUES (%s, %s)",
                    (version, description),
                )
                log.info("usage store: schema migrated to version %d (%s)", version, description)
    return current


def _connect(url: str, connect_timeout: int = 5, **options: Any) -> Any:
    import psycopg

    # the password: in the URL, or (kept out of the process list) PGPASSWORD / ~/.pgpass as libpq reads them
    try:
        return psycopg.connect(url, connect_timeout=connect_timeout, application_name="policyplug", **options)
    except psycopg.Error as exc:
        # libpq quotes a URI it cannot parse whole, password included: the same error, without it
        text = str(exc)
        if safe_url(url) != url:
            text = text.replace(url, safe_url(url))
            secret = url[len(safe_url(url).partition("***@")[0]) :].rpartition("@")[0]
            # libpq splits at the first `@`, so a password with an unescaped `@` shows up as a host name:
            # hide every piece of the user information as well as the whole of it
            for piece in sorted([secret, *re.split(r"[:@]", secret)], key=len, reverse=True):
                if len(piece) >= 2:
                    text = text.replace(piece, "***")
            raise type(exc)(text) from None
        raise


class PostgresUsageStore(UsageStore):
    def __init__(self, url: str, flush_interval: float = 1.0, background: bool = True) -> None:
        self.url = url
        self.path = safe_url(url)  # type: ignore[assignment]  # what the base class's messages name
        self.lost = 0  # counts dropped because PostgreSQL stayed away too long
        self.down = False
        # what is taken from the tally but not yet written: kept across failures
        self._pending: tuple[Counter[Any], Counter[Any], Counter[Any]] = (Counter(), Counter(), Counter())
        self._db: Any = _connect(
            url, autocommit=True
        )  # unreachable or refused at start: an error now, not a silent loss
        migrate(self._db)
        self._retry_at = 0.0  # background=False: no try before this (monotonic) during an outage
        self._pause = 1.0
        self._start_tally(flush_interval, background, "policyplug-usage-postgres")

    def flush(self) -> None:
        """Hand the tally to the writer thread (never waits for PostgreSQL); without one, write now."""
        self._last_flush = time.monotonic()
        if self._writer is not None:
            self._wake.set()
        elif not self.down or time.monotonic() >= self._retry_at:
            self._drain()
            if self.down:
                self._retry_at = time.monotonic() + self._pause
                self._pause = min(self._pause * 2, 60.0)
            else:
                self._pause = 1.0

    def _drain(self) -> None:
        with self._write_lock:
            traffic, users, tags = self._take()
            pending = self._pending
            pending[0].update(traffic)
            pending[1].update(users)
            pending[2].update(tags)
            if not any(pending):
                return
            self._write(*pending)

    def _write(self, traffic: Counter[Any], users: Counter[Any], tags: Counter[Any]) -> None:
        import psycopg

        for _attempt in range(3):
            try:
                if self._db is None or self._db.closed:
                    # inline (background=False), a connect attempt holds up a decision: shorter
                    self._db = _connect(self.url, 5 if self._writer is not None else 1, autocommit=True)
                with self._db.transaction(), self._db.cursor() as cursor:
                    # sorted: every node locks rows in one order, so concurrent batches never deadlock
                    cursor.executemany(UPSERT_TRAFFIC, [(*k, n) for k, n in sorted(traffic.items())])
                    cursor.executemany(UPSERT_USERS, [(*k, n) for k, n in sorted(users.items())])
                    cursor.executemany(UPSERT_TAGS, [(*k, n) for k, n in sorted(tags.items())])
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure) as exc:
                self.last_error = str(exc)  # rolled back, nothing written: the same batch again
                continue
            except (psycopg.Error, OSError) as exc:
                self._failed(exc, traffic, users, tags)
                return
            for counter in (traffic, users, tags):
                counter.clear()
            if self.down:
                self.down = False
                log.warning("usage store %s: written again; the counts kept meanwhile are in", self.path)
            return
        self._failed(RuntimeError(f"deadlocks 3 times: {self.last_error}"), traffic, users, tags)

    def _failed(
        self, exc: BaseException, traffic: Counter[Any], users: Counter[Any], tags: Counter[Any]
    ) -> None:
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}".strip()
        try:
            if self._db is not None:
                self._db.close()
        except Exception:  # closing a broken connection may fail too; a new one is made next time
            pass
        self._db = None
        rows = len(traffic) + len(users) + len(tags)
        if rows > MAX_PENDING_ROWS:
            self.lost += sum(traffic.values())
            for counter in (traffic, users, tags):
                counter.clear()
            log.error("usage store %s: unreachable too long, %d pending rows dropped", self.path, rows)
        if not self.down:
            self.down = True
            log.error(
                "usage store %s: %s; counts are kept in memory and written when it is back",
                self.path,
                self.last_error,
            )

    def status(self) -> dict[str, Any]:
        return {
            "backend": "postgresql",
            "url": self.path,
            "down": self.down,
            "errors": self.errors,
            "last_error": self.last_error,
            "lost": self.lost,
            "pending_rows": sum(len(c) for c in self._pending),
        }

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            self._writer.join(timeout=30)
        self._drain()
        if any(self._pending):
            log.error(
                "usage store %s: closing with %d rows not written (%s)",
                self.path,
                sum(len(c) for c in self._pending),
                self.last_error,
            )
        if self._db is not None:
            self._db.close()


def build_tables(url: str, since: str | None = None, until: str | None = None, top: int = 10) -> list[Table]:
    """policyplug.usage.report.build_tables for a PostgreSQL store: the same tables, row for row."""
    import psycopg

    clauses, params = [], []
    if since:
        clauses.append("hour >= %s")
        params.append(since[:13] + ":00Z" if len(since) >= 13 else since)
    if until:
        clauses.append("hour < %s")
        params.append(until[:13] + ":00Z" if len(until) >= 13 else until)
    where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    and_where = (where + " AND ") if where else " WHERE "
    try:
        db = _connect(url)
    except psycopg.Error as exc:
        raise OSError(f"usage store {safe_url(url)}: {exc}".strip()) from None
    try:
        db.read_only = True
        known = db.execute("SELECT to_regclass('policyplug_schema') IS NOT NULL").fetchone()
        if not known[0]:
            raise FileNotFoundError(f"no usage store at {safe_url(url)} (no policyplug_schema table)")
        by_direction = db.execute(
            f"SELECT direction, decision, SUM(count)::bigint FROM traffic{where} GROUP BY direction, decision "
            "ORDER BY direction, decision",
            params,
        ).fetchall()
        domains = db.execute(
            "SELECT domain, events, refused FROM (SELECT CASE WHEN direction = 'outbound' THEN recipient_domain "
            "ELSE sender_domain END AS domain, SUM(count)::bigint AS events, "
            f"SUM(CASE WHEN decision IN ('deny', 'drop') THEN count ELSE 0 END)::bigint AS refused FROM traffic"
            f"{and_where}direction IN ('outbound', 'inbound') GROUP BY 1) AS d ORDER BY events DESC, domain LIMIT %s",
            [*params, top],
        ).fetchall()
        denied = db.execute(
            f"SELECT rule, decision, SUM(count)::bigint FROM traffic{and_where}decision IN ('deny', 'drop') "
            "GROUP BY rule, decision ORDER BY 3 DESC, 1, 2 LIMIT %s",
            [*params, top],
        ).fetchall()
        users = db.execute(
            "SELECT \"user\", SUM(count)::bigint, SUM(CASE WHEN direction != 'internal' THEN count ELSE 0 END)::bigint "
            f'FROM user_messages{where} GROUP BY "user" ORDER BY 2 DESC, 1 LIMIT %s',
            [*params, top],
        ).fetchall()
        tags = db.execute(
            f"SELECT tag, direction, decision, SUM(count)::bigint FROM tag_traffic{where} "
            "GROUP BY tag, direction, decision ORDER BY tag, direction, decision",
            params,
        ).fetchall()
    except psycopg.Error as exc:
        raise OSError(f"usage store {safe_url(url)}: {exc}".strip()) from None
    finally:
        db.close()
    return [
        Table("Traffic by direction and outcome", ["direction", "decision", "events"], by_direction),
        Table("Top external domains", ["domain", "events", "refused"], domains),
        Table("Top denied rules", ["rule", "decision", "events"], denied),
        Table("Busiest users (messages)", ["user", "messages", "external"], users),
        Table("Traffic by tag", ["tag", "direction", "decision", "events"], tags),
    ]
