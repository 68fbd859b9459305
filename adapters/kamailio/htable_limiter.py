"""`limit` windows counted across all Kamailio workers, in an htable (Kamailio shared memory).

Kamailio's SIP workers are forked processes; each runs its own Python, so an in-process
counter would let every worker allow N events: N times the limit. The htable module keeps
items in shared memory and offers per-item locks to KEMI (`sht_lock`/`sht_unlock`), so each
window is one item holding the timestamps of its last limit+1 events, read, updated and
written back under the item's lock: exact sliding windows, shared by every worker, expiring
from shared memory when idle (`sht_setxs`). A restart of Kamailio starts every window afresh.

Cost: one lock, one get and one set per `limit` clause reached; an item holds at most limit+1
timestamps (about 14 bytes each), so very large limits (thousands per window) cost more per hit.
"""

from __future__ import annotations

import hashlib
from typing import Any


class HtableLimiter:
    """policyplug.limits.Limiter over a Kamailio htable (`modparam("htable", "htable", NAME=>...)`)."""

    def __init__(self, ksr: Any, table: str = "policyplug_limits"):
        self.ksr = ksr
        self.table = table

    def hit(self, key: str, now: float, window: float, limit: int) -> bool:
        # item names: fixed length, no separators or bytes the htable could mind
        item = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
        htable = self.ksr.htable
        htable.sht_lock(self.table, item)
        try:
            stored = htable.sht_get(self.table, item)
            horizon = now - window
            stamps = [float(s) for s in stored.split()] if isinstance(stored, str) and stored else []
            stamps = [s for s in stamps if s > horizon]
            stamps.append(now)
            del stamps[: max(0, len(stamps) - (limit + 1))]  # older ones cannot change the answer
            htable.sht_setxs(self.table, item, " ".join(f"{s:.6f}" for s in stamps), int(window) + 1)
            return len(stamps) > limit
        finally:
            htable.sht_unlock(self.table, item)

    def reset(self) -> None:
        self.ksr.htable.sht_reset(self.table)
