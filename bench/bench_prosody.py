#!/usr/bin/env python3
"""Messages per second between two slixmpp clients through a real Prosody on loopback, three ways
in one run: without mod_policyplug (the baseline), with it and a trivial policy, with it and a
200-rule policy. Prints throughput and the median/p99 latency per message, and the share of the
baseline throughput each configuration keeps.

    python3 bench/bench_prosody.py [--messages 3000] [--window 200]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_engine import make_policy  # noqa: E402

from tests.servers.prosody import ProsodyServer  # noqa: E402
from tests.xmpp_client import TestClient  # noqa: E402

TRIVIAL = 'policy "trivial"\nlocal domains ["acme.example"]\ndefault allow\n'


def large_policy() -> str:
    # the benchmark policy of bench_engine (200 rules), for this server's domain
    return make_policy(200).replace('local domains ["acme.example", "eu.acme.example"]',
                                    'local domains ["acme.example"]')


async def pump(port: int, count: int, window: int) -> tuple[float, list[float]]:
    sender, receiver = TestClient("alice@acme.example", "pw"), TestClient("bob@acme.example", "pw")
    await sender.login(port)
    await receiver.login(port)
    # let the receiver's initial presence be processed (and decided) first: messages to a bare JID
    # whose resources are not yet available would not be delivered
    await asyncio.sleep(1.0)
    latencies: list[float] = []
    in_flight = asyncio.Semaphore(window)
    done = asyncio.Event()

    def received(msg) -> None:  # type: ignore[no-untyped-def]
        sent = float(msg["body"].split()[0])
        latencies.append((time.perf_counter() - sent) * 1000)
        in_flight.release()
        if len(latencies) == count:
            done.set()

    receiver.add_event_handler("message", received)
    started = time.perf_counter()
    for _ in range(count):
        await in_flight.acquire()
        sender.send_message(mto="bob@acme.example", mbody=f"{time.perf_counter()!r} hello", mtype="chat")
    try:
        await asyncio.wait_for(done.wait(), 120)
    except TimeoutError:
        print(f"  only {len(latencies)} of {count} messages arrived within 120 s", flush=True)
    elapsed = time.perf_counter() - started
    count = len(latencies)
    sender.disconnect()
    receiver.disconnect()
    return count / elapsed, latencies


def run_config(workdir: Path, policy: str | None, count: int, window: int) -> tuple[float, list[float]]:
    options = {}
    if policy is not None:
        options = {"acme.example": {"modules_enabled": ["policyplug"], "policyplug_component": "policy.acme.example",
                                    "policyplug_timeout": 5}}
    server = ProsodyServer(workdir, components={"policy.acme.example": "s3cret"},
                           plugin_paths=[str(ROOT / "adapters" / "prosody")], host_options=options,
                           )
    server.start()
    service = None
    try:
        server.register("alice", "acme.example", "pw")
        server.register("bob", "acme.example", "pw")
        if policy is not None:
            policy_file = workdir / "bench.policy"
            policy_file.write_text(policy)
            service = subprocess.Popen(
                [sys.executable, "-m", "policyplug", "serve", str(policy_file), "--component", "policy.acme.example",
                 "--secret", "s3cret", "--server", f"127.0.0.1:{server.component_port}",
                 "--socket", str(workdir / "s.sock")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            server.wait_for_component()
        return asyncio.run(pump(server.c2s_port, count, window))
    finally:
        if service is not None:
            service.send_signal(signal.SIGTERM)
            service.wait(timeout=30)
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--window", type=int, default=50, help="messages in flight")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, policy in (("without the module", None), ("module, trivial policy", TRIVIAL),
                              ("module, 200-rule policy", large_policy())):
            workdir = Path(tmp) / label.replace(" ", "-").replace(",", "")
            workdir.mkdir()
            rate, latencies = run_config(workdir, policy, args.messages, args.window)
            rows.append((label, rate, statistics.median(latencies), sorted(latencies)[int(len(latencies) * .99) - 1]))
    base_rate, base_median = rows[0][1], rows[0][2]
    print(f"{'configuration':<26} {'msg/s':>8} {'kept':>6} {'median ms':>10} {'added':>8} {'p99 ms':>8}")
    for label, rate, median, p99 in rows:
        print(f"{label:<26} {rate:>8,.0f} {rate / base_rate:>6.0%} {median:>10.2f} {median - base_median:>+8.2f} "
              f"{p99:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
