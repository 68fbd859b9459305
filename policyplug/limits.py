"""Sliding-window counters for `limit N per WINDOW by KEY`.

The clock is the event's time (seconds since the epoch), so `repeat N` in tests (events 1 ms
apart) is exact and a decision replayed from an audit log counts the same way. Adapters whose
workers share nothing (Kamailio) pass their own Limiter backed by shared memory.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol


class Limiter(Protocol):
    def hit(self, key: str, now: float, window: float, limit: int) -> bool:
        """Record one event for key at `now`; True when more than `limit` events, this one
        included, fell in the window (now - window, now]."""
        ...


class MemoryLimiter:
    """Exact sliding windows in process memory.

    Memory is bounded: a key keeps at most limit+1 timestamps (older ones cannot change the
    answer), and keys idle for longer than their window are swept out now and then."""

    def __init__(self, max_keys: int = 1_000_000):
        self._windows: dict[str, tuple[deque[float], float]] = {}
        self._max_keys = max_keys
        self._hits_since_sweep = 0

    def hit(self, key: str, now: float, window: float, limit: int) -> bool:
        entry = self._windows.get(key)
        if entry is None:
            stamps: deque[float] = deque(maxlen=limit + 1)
            self._windows[key] = (stamps, window)
            self._hits_since_sweep += 1
            if self._hits_since_sweep > 10_000 or len(self._windows) > self._max_keys:
                self._sweep(now)
        else:
            stamps = entry[0]
        stamps.append(now)
        horizon = now - window
        while stamps and stamps[0] <= horizon:
            stamps.popleft()
        return len(stamps) > limit

    def _sweep(self, now: float) -> None:
        self._hits_since_sweep = 0
        idle = [
            k for k, (stamps, window) in self._windows.items() if not stamps or stamps[-1] <= now - window
        ]
        for key in idle:
            del self._windows[key]
        if len(self._windows) > self._max_keys:
            # Still too many live keys (a flood of distinct senders): forget the oldest half
            # rather than grow without bound; a forgotten key starts counting afresh.
            for key in list(self._windows)[: len(self._windows) // 2]:
                del self._windows[key]

    def reset(self) -> None:
        self._windows.clear()

    def __len__(self) -> int:
        return len(self._windows)
