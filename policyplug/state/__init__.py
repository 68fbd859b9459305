"""State that decisions share between processes and nodes (docs/scaling.md).

Without `--state` every `limit` window lives in the deciding process (policyplug.limits); with
`--state redis://HOST:PORT/DB` (or `redis+sentinel://...`) the windows live in Redis, so every
process and node that uses the same Redis enforces one limit.
"""

from __future__ import annotations

import re

from ..limits import Limiter

FAILURE_MODES = ("open", "closed")

# from after `scheme:` (and its slashes) to the URL's last `@`: user and password, whatever they hold
# (an unescaped `/` or `@` in a password, a URL too broken for urlsplit)
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*:/*).*@")


def redact_url(url: str) -> str:
    """The URL with its user and password shown as `***`, for every log line, status and message
    (redis://, redis+sentinel://, postgresql://)."""
    return _USERINFO.sub(r"\1***@", url)


def make_limiter(url: str | None, failure: str = "closed") -> Limiter | None:
    """The limiter a `--state` URL names; None without one (each loaded policy then counts in its
    own process memory, policyplug.limits.MemoryLimiter, as before)."""
    if not url:
        return None
    from .redis_limiter import RedisLimiter
    return RedisLimiter(url, failure=failure)
