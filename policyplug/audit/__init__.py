"""The audit trail: hash-chained JSON Lines of audited decisions (log.py) and its verifier (verify.py)."""

from .log import AuditWriter, should_audit
from .verify import VerifyResult, verify

__all__ = ["AuditWriter", "should_audit", "verify", "VerifyResult"]
