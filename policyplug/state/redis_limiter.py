"""`limit` windows in Redis, shared by every process and node that uses the same Redis.

Each window (one rule, one value of its key) is a sorted set of the timestamps of its last
limit+1 events; one Lua script drops the timestamps that left the window, adds this one, trims
the set and reads its size. Redis runs a script atomically, so windows stay exact however many
workers and nodes hit one key at once. The arithmetic is policyplug.limits.MemoryLimiter's: a
timestamp t is in the window of `now` when t > now - window, and the event clock is the event's
time, so the answer does not depend on which node decides.

Only a `limit` clause that is reached calls Redis (one round trip); decisions without one never
do. When Redis cannot be reached, the operator's `failure` mode answers (`closed`: the limit
counts as exceeded, so the rule applies; `open`: it does not), the outage is logged once and
counted, and for `retry_interval` seconds no further attempt is made (so an outage costs each
decision nothing, not a connect timeout); then the next hit tries again. The pause doubles with
each failed try, up to `max_retry_interval`, so a Redis that does not answer at all (packets
dropped: each try waits for the timeout) stalls the deciding thread for a small share of the time. A command whose
connection broke (a Redis restart) is retried once on a new connection with the same member,
which ZADD stores once, so a retry never counts an event twice. Each process uses one connection
of its own (a deciding thread sends one command at a time).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
import time
from typing import Any
from urllib.parse import unquote, urlsplit

from .redaction import redact_url

log = logging.getLogger("policyplug.state")

# KEYS[1] the window; ARGV: now, horizon (now - window), limit, ttl in ms, this event's member
HIT_SCRIPT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[5])
local n = redis.call('ZCARD', KEYS[1])
local keep = tonumber(ARGV[3]) + 1
if n > keep then
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, n - keep - 1)
  n = keep
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return n
"""


def _sentinel_client(url: str, timeout: float) -> Any:
    """`redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]`: the master that the
    Sentinels name, found again after a failover."""
    from redis.sentinel import Sentinel

    parts = urlsplit(url)
    netloc = parts.netloc
    password = None
    if "@" in netloc:
        credentials, netloc = netloc.rsplit("@", 1)
        password = unquote(credentials.partition(":")[2]) or None
    password = password or os.environ.get("POLICYPLUG_REDIS_PASSWORD") or None
    hosts = []
    for item in netloc.split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--state {redact_url(url)}: sentinel address '{item}' is not HOST:PORT")
        hosts.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError(
            f"--state {redact_url(url)}: the Sentinel service (master) name is missing: "
            "redis+sentinel://HOST:PORT/SERVICE/DB"
        )
    db = int(path[1]) if len(path) > 1 else 0
    sentinel = Sentinel(hosts, socket_timeout=timeout, socket_connect_timeout=timeout)
    return sentinel.master_for(
        path[0], db=db, password=password, socket_timeout=timeout, socket_connect_timeout=timeout
    )


def connect(url: str, timeout: float = 0.25) -> Any:
    """A redis-py client for a `--state` URL (redis://, rediss://, unix://, redis+sentinel://).

    A password may be in the URL or, kept out of the process list, in $POLICYPLUG_REDIS_PASSWORD.
    """
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    if url.startswith("redis+sentinel://"):
        return _sentinel_client(url, timeout)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(
            f"--state {redact_url(url)}: expected redis://HOST:PORT/DB, rediss://, unix:// or "
            "redis+sentinel://HOST:PORT,.../SERVICE/DB"
        )
    options: dict[str, Any] = {}
    if os.environ.get("POLICYPLUG_REDIS_PASSWORD") and not urlsplit(url).password:
        options["password"] = os.environ["POLICYPLUG_REDIS_PASSWORD"]
    # one retry on a fresh connection: a Redis restart costs one failed command, not a decision
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=0,
        **options,
    )


class RedisLimiter:
    """policyplug.limits.Limiter over Redis sorted sets (see the module's docstring)."""

    def __init__(
        self,
        url: str,
        *,
        failure: str = "closed",
        prefix: str = "policyplug:limit:",
        timeout: float = 0.25,
        retry_interval: float = 1.0,
        max_retry_interval: float = 8.0,
        client: Any = None,
    ):
        if failure not in ("open", "closed"):
            raise ValueError(f"state failure mode must be 'open' or 'closed', not {failure!r}")
        connect(url, timeout) if client is None else None  # a bad URL is an error at start, not per hit
        self.url = url
        self.failure = failure
        self.prefix = prefix
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.max_retry_interval = max_retry_interval
        self._pause = retry_interval  # the current pause between tries during an outage
        self._client = client
        self._sha: str | None = None  # the script's SHA1 once loaded
        self._conn: Any = None
        self._conn_lock = threading.Lock()
        self._pid = os.getpid()
        self._down_until = 0.0
        self._lock = threading.Lock()
        # counters for status and metrics: hits answered by Redis, hits answered by the failure
        # mode, failed Redis calls, outages (a run of failures), recoveries
        self.stats: dict[str, int] = {
            "hits": 0,
            "failed_open": 0,
            "failed_closed": 0,
            "errors": 0,
            "outages": 0,
            "recoveries": 0,
        }
        self.last_error: str | None = None
        self.down = False

    def _redis(self) -> Any:
        """This process's own connection, taken from a redis-py pool once and kept: a command sent
        on it directly costs about half the CPU of one through the client (pool, retry and event
        machinery: ~27 against ~60 µs measured). Sentinel pools hand out connections that find
        the master when they connect."""
        # a client made before Kamailio forks its workers must not be shared by them
        if self._client is None or self._pid != os.getpid():
            self._client = connect(self.url, self.timeout)
            self._pid = os.getpid()
            self._conn = None
        if self._conn is None:
            self._conn = self._client.connection_pool.get_connection()
        return self._conn

    def _command(self, *args: Any) -> Any:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        conn = self._redis()
        try:
            conn.send_command(*args)
            return conn.read_response()
        except (RedisConnectionError, RedisTimeoutError, OSError):
            # one more try on a new connection (a Redis that restarted closed the old one); the
            # event's member is the same, so a command that did arrive is not counted twice
            conn.disconnect()
            conn.connect()  # connect() itself: a Sentinel connection asks where the master is now
            conn.send_command(*args)
            return conn.read_response()

    def _run_script(self, *args: Any) -> Any:
        """EVALSHA, loading the script first where Redis does not have it (first use, or a Redis
        that restarted or failed over)."""
        from redis.exceptions import NoScriptError, ResponseError

        try:
            if self._sha is not None:
                try:
                    return self._command("EVALSHA", self._sha, 1, *args)
                except NoScriptError:
                    pass
            self._sha = self._command("SCRIPT", "LOAD", HIT_SCRIPT)
            if isinstance(self._sha, bytes):
                self._sha = self._sha.decode()
            return self._command("EVALSHA", self._sha, 1, *args)
        except ResponseError:
            # e.g. READONLY from a master that became a replica: connect anew (Sentinel finds the
            # new master) on the next try
            self._drop_connection()
            raise

    def _drop_connection(self) -> None:
        """Forget this process's connection; the next command takes a new one from the pool, whose
        connect (for Sentinel: after asking where the master is) comes first."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.disconnect()
                self._client.connection_pool.release(conn)
            except Exception:  # a broken connection may fail to close: it is dropped all the same
                pass

    def key_for(self, key: str) -> str:
        # fixed length whatever the key's value (an address, a body...): no huge or odd Redis keys
        return self.prefix + hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()

    def hit(self, key: str, now: float, window: float, limit: int) -> bool:
        if self._down_until and time.monotonic() < self._down_until:
            return self._failed()
        member = f"{now!r}:{secrets.token_hex(8)}"
        ttl_ms = int(window * 1000) + 1000
        try:
            with self._conn_lock:  # one connection: one command at a time, whatever thread decides
                count = self._run_script(
                    self.key_for(key), repr(now), repr(now - window), limit, ttl_ms, member
                )
        except Exception as exc:  # redis.RedisError, OSError: any failure is an outage, never a crash
            with self._conn_lock:
                self._drop_connection()
            return self._outage(exc)
        if self.down:
            with self._lock:
                self.down = False
                self._down_until = 0.0
                self._pause = self.retry_interval
                self.stats["recoveries"] += 1
            log.warning("state: Redis %s reachable again; limits are shared again", self._safe_url())
        self.stats["hits"] += 1
        return int(count) > limit

    def _outage(self, exc: BaseException) -> bool:
        with self._lock:
            self.stats["errors"] += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            first = not self.down
            if not first:
                self._pause = min(self._pause * 2, self.max_retry_interval)
            self._down_until = time.monotonic() + self._pause
            if first:
                self.down = True
                self.stats["outages"] += 1
        if first:
            log.error(
                "state: Redis %s unreachable (%s); limits fail %s until it is back",
                self._safe_url(),
                self.last_error,
                self.failure,
            )
        return self._failed()

    def _failed(self) -> bool:
        if self.failure == "closed":
            self.stats["failed_closed"] += 1
            return True
        self.stats["failed_open"] += 1
        return False

    def _safe_url(self) -> str:
        return redact_url(self.url)

    def status(self) -> dict[str, Any]:
        return {
            "backend": "redis",
            "url": self._safe_url(),
            "failure": self.failure,
            "down": self.down,
            "last_error": self.last_error,
            **self.stats,
        }

    def reset(self) -> None:
        """Forget every window under this limiter's prefix (tests; `policyplug test` never uses Redis)."""
        client = self._client if self._client is not None and self._pid == os.getpid() else connect(self.url)
        for name in client.scan_iter(match=self.prefix + "*", count=1000):
            client.delete(name)
