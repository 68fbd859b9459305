"""The soak's decision clients (tests/test_soak.py), in a process of their own.

Run by the soak as `python -m tests.soak_client SOCKET UNTIL OUT`: DECISION_CLIENTS connections send
decisions on a fixed schedule until UNTIL (time.monotonic(), which every process reads from the same
clock) and the tally is written to OUT as JSON. In the test's process the clients shared the
interpreter with slixmpp, the Prosody restarts, the malformed and disconnecting clients and the
memory sampler: their latencies counted the test's own waits for the interpreter as the service's.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

DECISION_CLIENTS = 4
INTERVAL = 0.005  # seconds between one client's requests: 200/s each, 800/s in all
MAX_BACKLOG = 0.5  # seconds a client may fall behind its schedule before it skips ahead


@dataclass
class Tally:
    sent: int = 0
    answered: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    at: list[float] = field(default_factory=list)  # monotonic time of each latency
    backlog_resets: int = 0
    problems: list[str] = field(default_factory=list)


async def decision_client(path: Path, name: str, until: float, tally: Tally, rng: random.Random) -> None:
    reader, writer = await asyncio.open_unix_connection(str(path))
    users = [f"u{i}@acme.example" for i in range(50)] + [f"v{i}@d{i}.example" for i in range(50)]
    n = 0
    # Requests go out on a fixed schedule and each latency counts from its scheduled time, so a
    # stall delays every request that should have gone out meanwhile (a client that only sends
    # when answered would see one slow request per stall: "coordinated omission").
    scheduled = time.perf_counter()
    try:
        while time.monotonic() < until:
            n += 1
            burst = rng.choice((1, 1, 1, 4))  # mostly one at a time, sometimes pipelined
            scheduled += INTERVAL * burst
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -MAX_BACKLOG:
                # this far behind, the machine stopped the client or the service for longer than any
                # reload: count it, and do not carry the backlog on (it would weigh on every later
                # request, both phases alike, and hide what the reloads cost)
                tally.backlog_resets += 1
                scheduled = time.perf_counter() - MAX_BACKLOG
            sent_at = scheduled
            ids = []
            for k in range(burst):
                request_id = f"{name}-{n}-{k}"
                ids.append(request_id)
                event = {
                    "kind": rng.choice(("message", "presence", "call")),
                    "from": rng.choice(users),
                    "to": rng.choice(users + ["x@partner.example"]),
                    "body": rng.choice(("hi", "secret-7 x", "")),
                }
                writer.write(json.dumps({"id": request_id, "event": event}).encode() + b"\n")
                tally.sent += 1
            await writer.drain()
            pending = set(ids)
            while pending:
                line = await asyncio.wait_for(reader.readline(), 30)
                if not line:
                    tally.problems.append(
                        f"{name}: connection closed with {len(pending)} requests unanswered"
                    )
                    return
                answer = json.loads(line)
                if answer.get("id") is None and "reloaded" in answer:
                    continue
                if answer.get("id") not in pending:
                    tally.problems.append(f"{name}: unexpected answer {line[:200]!r}")
                    continue
                pending.discard(answer["id"])
                tally.answered += 1
                if "decision" in answer:
                    tally.latencies.append(max(0.0, time.perf_counter() - sent_at))
                    tally.at.append(time.monotonic() - (time.perf_counter() - sent_at))
                else:
                    tally.errors += 1
                    tally.problems.append(f"{name}: error for a valid event: {answer}")
    finally:
        writer.close()


async def clients(path: Path, until: float) -> Tally:
    tally = Tally()
    await asyncio.gather(
        *(decision_client(path, f"c{i}", until, tally, random.Random(i)) for i in range(DECISION_CLIENTS))
    )
    return tally


def main() -> None:
    sock, until, out = Path(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])
    tally = asyncio.run(clients(sock, until))
    out.write_text(json.dumps(asdict(tally)))


if __name__ == "__main__":
    main()
