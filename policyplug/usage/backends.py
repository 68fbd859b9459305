"""Which usage store `--usage-db` names: a SQLite file, or PostgreSQL shared by every node.

Its own module so that the backends (store.py, postgres_store.py) need not import each other.
"""

from __future__ import annotations

from pathlib import Path

from .postgres_store import PostgresUsageStore
from .store import UsageStore


def is_postgres_url(target: str | Path) -> bool:
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def open_usage_store(target: str | Path, flush_interval: float = 1.0, background: bool = True) -> UsageStore:
    """The usage store `--usage-db` names: a SQLite file, or a PostgreSQL URL (shared by every node,
    docs/scaling.md). `background=False` where no thread runs between requests (a Kamailio worker)."""
    if is_postgres_url(target):
        return PostgresUsageStore(str(target), flush_interval=flush_interval, background=background)
    return UsageStore(target, flush_interval=flush_interval, background=background)
