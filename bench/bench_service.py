#!/usr/bin/env python3
"""Decision service throughput and latency, through the Unix socket and through the XMPP component.

One run prints:
  - baseline: in-process `policy.decide` on the same events (what the transports add overhead to),
  - socket: decisions/s and latency percentiles with a window of requests in flight on one connection,
  - component: decisions/s and latency of decision IQs sent by a slixmpp client through a real Prosody
    (skipped with a note when prosody is not installed),
with the audit log at level `all`, on the bundled example policy.

    python3 bench/bench_service.py [--requests 50000] [--window 64] [--iq-requests 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from policyplug import Event, load_policy  # noqa: E402

POLICY = ROOT / "policyplug" / "demo" / "acme" / "acme.policy"
EVENTS = [json.loads(p.read_text()) for p in sorted((ROOT / "policyplug" / "demo" / "events").glob("*.json"))]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def baseline(count: int) -> tuple[float, float]:
    policy = load_policy(POLICY)
    started = time.perf_counter()
    for i in range(count):
        policy.decide(Event.from_json(EVENTS[i % len(EVENTS)]))
    elapsed = time.perf_counter() - started
    return count / elapsed, elapsed / count * 1e6


def start_service(workdir: Path, *extra: str) -> subprocess.Popen[str]:
    sock = workdir / "pp.sock"
    proc = subprocess.Popen([sys.executable, "-m", "policyplug", "serve", str(POLICY), "--socket", str(sock),
                             "--audit-log", str(workdir / "audit.jsonl"), "--audit-level", "all", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"service did not start: {proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.05)
    return proc


def bench_socket(workdir: Path, count: int, window: int) -> tuple[float, list[float]]:
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(workdir / "pp.sock"))
    lines = [json.dumps({"id": i, "event": EVENTS[i % len(EVENTS)]}).encode() + b"\n" for i in range(count)]
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    buffer = b""
    next_to_send = 0
    started = time.perf_counter()
    while len(latencies) < count:
        if next_to_send < count and next_to_send - len(latencies) < window:
            batch_end = min(count, len(latencies) + window)
            now = time.perf_counter()
            for i in range(next_to_send, batch_end):
                sent_at[i] = now
            client.sendall(b"".join(lines[next_to_send:batch_end]))
            next_to_send = batch_end
        buffer += client.recv(1 << 20)
        *complete, buffer = buffer.split(b"\n")
        now = time.perf_counter()
        for line in complete:
            answer = orjson.loads(line)
            assert "decision" in answer, answer
            latencies.append((now - sent_at.pop(answer["id"])) * 1000)
    elapsed = time.perf_counter() - started
    client.close()
    return count / elapsed, latencies


def bench_component(workdir: Path, count: int, window: int) -> tuple[float, list[float]] | str:
    if not shutil.which("prosody"):
        return "prosody is not installed: component figures skipped"
    from slixmpp.xmlstream import ET

    from tests.servers.prosody import ProsodyServer
    from tests.xmpp_client import TestClient

    server = ProsodyServer(workdir / "prosody", components={"policy.acme.example": "s3cret"},
                           global_options={"limits": {"c2s": {"rate": "100mb/s"}}})
    server.start()
    server.register("bench", "acme.example", "pw")
    service = subprocess.Popen([sys.executable, "-m", "policyplug", "serve", str(POLICY), "--component",
                                "policy.acme.example", "--secret", "s3cret", "--server",
                                f"127.0.0.1:{server.component_port}", "--socket", str(workdir / "c.sock"),
                                "--audit-log", str(workdir / "c-audit.jsonl"), "--audit-level", "all"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        server.wait_for_component()

        async def run() -> tuple[float, list[float]]:
            client = TestClient("bench@acme.example", "pw")
            await client.login(server.c2s_port)
            latencies: list[float] = []
            semaphore = asyncio.Semaphore(window)

            async def one(i: int) -> None:
                async with semaphore:
                    iq = client.make_iq_get(ito="policy.acme.example")
                    element = ET.Element("{urn:policyplug:decision:1}decide")
                    element.text = json.dumps(EVENTS[i % len(EVENTS)])
                    iq.append(element)
                    sent = time.perf_counter()
                    await iq.send(timeout=30)
                    latencies.append((time.perf_counter() - sent) * 1000)

            started = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(count)))
            elapsed = time.perf_counter() - started
            client.disconnect()
            return count / elapsed, latencies

        return asyncio.run(run())
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=30)
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--window", type=int, default=64, help="requests in flight on the socket")
    parser.add_argument("--iq-requests", type=int, default=3000)
    parser.add_argument("--iq-window", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        rate, per = baseline(args.requests)
        print(f"baseline  in-process decide (incl. event parsing): {rate:>9,.0f} decisions/s  {per:6.2f} µs each")
        proc = start_service(workdir)
        try:
            rate, latencies = bench_socket(workdir, args.requests, args.window)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        print(f"socket    window {args.window:>3}, audit all:             {rate:>9,.0f} decisions/s  "
              f"p50 {percentile(latencies, .5):.3f} ms  p99 {percentile(latencies, .99):.3f} ms")
        result = bench_component(workdir, args.iq_requests, args.iq_window)
        if isinstance(result, str):
            print(f"component {result}")
        else:
            rate, latencies = result
            print(f"component via Prosody, window {args.iq_window:>3}, audit all: {rate:>9,.0f} decisions/s  "
                  f"p50 {percentile(latencies, .5):.3f} ms  p99 {percentile(latencies, .99):.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
