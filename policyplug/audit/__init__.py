"""The audit trail: hash-chained JSON Lines of audited decisions (docs/audit.md).

record.py makes every record's bytes and chain; log.py is the decision service's writer;
multiprocess_log/ the log that forked workers (Kamailio) share; seal.py seals a log with a
forward-secure key, syslog.py sends its chain heads off the host; verify.py checks chains and seals.
"""

from .log import AuditWriter, should_audit
from .verify import VerifyResult, verify

__all__ = ["AuditWriter", "should_audit", "verify", "VerifyResult"]
