"""What the worker-side writers (SharedAuditLog, AuditSpool) share: the audit level, making
records, counting failures. `submit` never raises: auditing must never break a decision."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ..log import LEVELS, should_audit
from ..record import RecordEncoder, canonical
from . import fork

log = logging.getLogger("policyplug.audit")
RECORD_KEYS = {"v", "id", "time", "node", "policy", "policy_revision", "event", "decision"}


def check_level(level: str) -> None:
    if level not in LEVELS:
        raise ValueError(f"audit level must be one of {', '.join(LEVELS)}, not {level!r}")


def new_encoder(node: str, include_bodies: bool) -> RecordEncoder:
    """A record encoder whose id pool a forked child empties."""
    encoder = RecordEncoder(node, include_bodies)
    fork.register(encoder)
    return encoder


class RecordSink:
    """The base of SharedAuditLog and AuditSpool."""

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
            self.failed(exc)
            return False

    def put(self, record: dict[str, Any]) -> None:
        """A record made by log.build_record (without chain fields)."""
        if record.keys() != RECORD_KEYS:
            raise ValueError(f"not an audit record of docs/audit.md: keys {sorted(record)}")
        self.put_line(canonical(record))

    def put_line(self, line: bytes) -> None:
        """A record as canonical JSON without chain fields (RecordEncoder.line)."""
        raise NotImplementedError

    def failed(self, exc: BaseException) -> None:
        self.stats["errors"] += 1
        self.stats["last_error"] = f"{type(exc).__name__}: {exc}"
        self.stats["last_error_at"] = time.time()
        log.error("audit %s: %s", self.where, self.stats["last_error"])
