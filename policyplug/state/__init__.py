"""State that decisions share between processes and nodes (docs/scaling.md).

Without `--state` every `limit` window lives in the deciding process (policyplug.limits); with
`--state redis://HOST:PORT/DB` (or `redis+sentinel://...`) the windows live in Redis, so every
process and node that uses the same Redis enforces one limit.
"""

from __future__ import annotations

from ..limits import Limiter
from .redaction import redact_url

__all__ = ["FAILURE_MODES", "make_limiter", "redact_url"]

FAILURE_MODES = ("open", "closed")


def make_limiter(url: str | None, failure: str = "closed") -> Limiter | None:
    """The limiter a `--state` URL names; None without one (each loaded policy then counts in its
    own process memory, policyplug.limits.MemoryLimiter, as before)."""
    if not url:
        return None
    from .redis_limiter import RedisLimiter

    return RedisLimiter(url, failure=failure)
