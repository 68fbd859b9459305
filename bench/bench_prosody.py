#!/usr/bin/env python3
"""Messages per second between two slixmpp clients through a real Prosody on loopback, four ways
in one run: without mod_policyplug (the baseline), with it and a trivial policy (its decision cache
off, then on), with it and a 200-rule policy (which reads bodies, so nothing is cached). Prints throughput and the median/p99 latency per message, and the share of the
baseline throughput each configuration keeps.

    python3 bench/bench_prosody.py [--messages 3000] [--window 50] [--rounds 3] [--transport socket|component]

POLICYPLUG_PROSODY_ADAPTER=DIR loads mod_policyplug.lua from DIR instead (to measure a variant).
`--baseline TREE` compares two checkouts in the same run (e.g. one made with `git worktree add
--detach /tmp/base COMMIT`): each module configuration runs with this tree's mod_policyplug and
service and with TREE's (its adapters/prosody, and `python -m policyplug` with PYTHONPATH=TREE),
one after the other in an order that alternates between rounds, and a last table gives each
configuration's CPU per message and throughput against the baseline's.
The module asks the decision service over its Unix socket by default (`--transport component`:
decision IQs to its XEP-0114 component). The receiver stamps each message on arrival; latency is
arrival minus the send time written in the body, so "added" is the median with the module minus
the median without it, measured in the same run. "Added latency" is taken from messages sent one
at a time (the cost per message); with many in flight latency is mostly queueing, shown as
"loaded". Throughput is the median over rounds that interleave the configurations.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
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
    return make_policy(200).replace(
        'local domains ["acme.example", "eu.acme.example"]', 'local domains ["acme.example"]'
    )


@dataclass
class Result:
    rate: float = 0.0  # messages/s, `window` in flight
    loaded: list[float] = field(default_factory=list)  # latencies (ms) in that run
    unloaded: list[float] = field(default_factory=list)  # latencies (ms), one message at a time
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per process, loaded run


async def send_and_time(
    sender: TestClient, receiver: TestClient, count: int, window: int
) -> tuple[float, list[float]]:
    """Send `count` messages, at most `window` unanswered; -> (messages/s, latencies in ms)."""
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
    receiver.del_event_handler("message", received)
    return len(latencies) / elapsed, latencies


async def pump(port: int, count: int, window: int, latency_count: int, pids: dict[str, int]) -> Result:
    sender, receiver = TestClient("alice@acme.example", "pw"), TestClient("bob@acme.example", "pw")
    await sender.login(port)
    await receiver.login(port)
    # let the receiver's initial presence be processed (and decided) first: messages to a bare JID
    # whose resources are not yet available would not be delivered
    await asyncio.sleep(1.0)
    result = Result()
    await send_and_time(sender, receiver, min(200, count), window)  # warm-up (JIT-free Lua, but caches)
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    client_before = time.process_time()
    result.rate, result.loaded = await send_and_time(sender, receiver, count, window)
    result.cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    result.cpu["clients"] = time.process_time() - client_before
    _, result.unloaded = await send_and_time(sender, receiver, latency_count, 1)
    sender.disconnect()
    receiver.disconnect()
    return result


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_socket(server: ProsodyServer, sock: Path, timeout: float = 30) -> None:
    """Until the module has connected to the service's socket (it retries every second)."""
    deadline = time.monotonic() + timeout
    while "connected to the decision service" not in server.log_text():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the module did not connect to {sock}:\n{server.log_text()[-2000:]}")
        time.sleep(0.1)


def run_config(
    workdir: Path,
    policy: str | None,
    count: int,
    window: int,
    latency_count: int,
    transport: str,
    module_options: dict[str, object] | None = None,
    tree: Path = ROOT,
) -> Result:
    """One configuration: Prosody with (policy given) mod_policyplug and the service of `tree`."""
    options = {}
    sock = workdir / "s.sock"
    if policy is not None:
        where = (
            {"policyplug_socket": str(sock)}
            if transport == "socket"
            else {"policyplug_component": "policy.acme.example"}
        )
        options = {
            "acme.example": {
                "modules_enabled": ["policyplug"],
                "policyplug_timeout": 5,
                **where,
                **(module_options or {}),
            }
        }
    # log level "info": Prosody logging every stanza (debug) would dominate what is measured
    server = ProsodyServer(
        workdir,
        components={"policy.acme.example": "s3cret"},
        plugin_paths=[
            os.environ.get("POLICYPLUG_PROSODY_ADAPTER", str(tree / "adapters" / "prosody"))
            if tree == ROOT
            else str(tree / "adapters" / "prosody")
        ],
        host_options=options,
        log_level="info",
    )
    server.start()
    service = None
    try:
        server.register("alice", "acme.example", "pw")
        server.register("bob", "acme.example", "pw")
        if policy is not None:
            policy_file = workdir / "bench.policy"
            policy_file.write_text(policy)
            command = [sys.executable, "-m", "policyplug", "serve", str(policy_file), "--socket", str(sock)]
            if transport == "component":
                command += [
                    "--component",
                    "policy.acme.example",
                    "--secret",
                    "s3cret",
                    "--server",
                    f"127.0.0.1:{server.component_port}",
                ]
            # the service of `tree`, not whatever policyplug is installed
            env = {**os.environ, "PYTHONPATH": str(tree)}
            service = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            if transport == "component":
                server.wait_for_component()
            else:
                wait_for_socket(server, sock)
        assert server.process is not None
        pids = {"prosody": server.process.pid}
        if service is not None:
            pids["service"] = service.pid
        return asyncio.run(pump(server.c2s_port, count, window, latency_count, pids))
    finally:
        if service is not None:
            service.send_signal(signal.SIGTERM)
            service.wait(timeout=30)
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=3000, help="messages in the throughput run")
    parser.add_argument("--window", type=int, default=50, help="messages in flight in the throughput run")
    parser.add_argument("--latency-messages", type=int, default=500, help="messages sent one at a time")
    parser.add_argument("--transport", choices=("socket", "component"), default="socket")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the configurations")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="another checkout to compare with in the same run (its module and service)",
    )
    args = parser.parse_args()
    baseline = args.baseline.resolve() if args.baseline else None
    if baseline is not None and not (baseline / "adapters" / "prosody" / "mod_policyplug.lua").exists():
        parser.error(f"--baseline {baseline}: no adapters/prosody/mod_policyplug.lua there")
    print(
        f"{args.messages} messages with {args.window} in flight, then {args.latency_messages} one at a time; "
        f"transport {args.transport}",
        flush=True,
    )
    # the trivial policy reads nothing: the module caches its decisions (socket transport); the
    # same policy with the cache off shows what the cache is worth
    configs: list[tuple[str, str | None, dict[str, object] | None, Path]] = [
        ("without the module", None, None, ROOT),
        ("module, trivial, no cache", TRIVIAL, {"policyplug_cache": False}, ROOT),
        ("module, trivial policy", TRIVIAL, None, ROOT),
        ("module, 200-rule policy", large_policy(), None, ROOT),
    ]
    if baseline is not None:
        print(f"baseline: {baseline} (rows marked 'base')", flush=True)
        configs = [
            (f"{label}{suffix}", policy, options, tree)
            for label, policy, options, _ in configs
            for suffix, tree in ((("", ROOT),) if policy is None else (("", ROOT), (" base", baseline)))
        ]
    runs: dict[str, list[Result]] = {label: [] for label, _, _, _ in configs}
    with tempfile.TemporaryDirectory() as tmp:
        # rounds interleave the configurations, so a slow moment of the machine hits all of them
        for round_no in range(args.rounds):
            order = list(configs)
            if baseline is not None and round_no % 2:  # the two trees' runs of a configuration swap places
                order = [order[0]] + [c for pair in zip(order[2::2], order[1::2], strict=True) for c in pair]
            for label, policy, module_options, tree in order:
                workdir = Path(tmp) / f"{round_no}-{label.replace(' ', '-').replace(',', '')}"
                workdir.mkdir()
                result = run_config(
                    workdir,
                    policy,
                    args.messages,
                    args.window,
                    args.latency_messages,
                    args.transport,
                    module_options,
                    tree,
                )
                runs[label].append(result)
                print(
                    f"  round {round_no + 1}: {label:<31} {result.rate:>8,.0f} msg/s, "
                    f"1-at-a-time median {statistics.median(result.unloaded):.3f} ms, "
                    + ", ".join(f"{n} {c * 1e6 / args.messages:.1f}" for n, c in result.cpu.items())
                    + " µs CPU/msg",
                    flush=True,
                )
    rows = []
    for label, results in runs.items():
        rows.append(
            (
                label,
                statistics.median(r.rate for r in results),
                [x for r in results for x in r.loaded],
                [x for r in results for x in r.unloaded],
                {name: statistics.median(r.cpu[name] for r in results) for name in results[0].cpu},
            )
        )
    base_rate, base_median = rows[0][1], statistics.median(rows[0][3])
    print(f"\nmedians over {args.rounds} rounds")
    print(
        f"{'configuration':<31} {'msg/s':>8} {'kept':>6} {'loaded median':>14} {'p99':>7}   "
        f"{'1-at-a-time median':>18} {'added':>7} {'p99':>7}   CPU s per 1000 msgs"
    )
    for label, rate, loaded, unloaded, cpu in rows:
        median = statistics.median(unloaded)
        cpu_text = ", ".join(f"{name} {seconds * 1000 / args.messages:.2f}" for name, seconds in cpu.items())
        print(
            f"{label:<31} {rate:>8,.0f} {rate / base_rate:>6.0%} {statistics.median(loaded):>11.2f} ms "
            f"{percentile(loaded, 0.99):>7.2f}   {median:>15.3f} ms {median - base_median:>+7.3f} "
            f"{percentile(unloaded, 0.99):>7.2f}   {cpu_text}"
        )
    if baseline is not None:
        compare(runs, args.messages)
    return 0


def compare(runs: dict[str, list[Result]], messages: int) -> None:
    """This tree against the baseline, per configuration: the medians over rounds of the CPU per
    message of Prosody and the service (the module's cost is Prosody's), of the throughput and of the
    1-at-a-time latency, and the median of the per-round ratios (same round, same machine state)."""
    print("\nthis tree against the baseline (medians over rounds; ratio: median of the per-round ratios)")
    print(
        f"{'configuration':<26} {'Prosody+service CPU µs/msg':>27} {'ratio':>6}   "
        f"{'msg/s':>15} {'ratio':>6}   {'1-at-a-time ms':>15}"
    )
    for label, results in runs.items():
        base = runs.get(label + " base")
        if base is None:
            continue
        cpu = [(r.cpu["prosody"] + r.cpu.get("service", 0.0)) * 1e6 / messages for r in results]
        base_cpu = [(r.cpu["prosody"] + r.cpu.get("service", 0.0)) * 1e6 / messages for r in base]
        cpu_ratio = statistics.median(a / b for a, b in zip(cpu, base_cpu, strict=True))
        rate_ratio = statistics.median(a.rate / b.rate for a, b in zip(results, base, strict=True))
        print(
            f"{label:<26} {statistics.median(cpu):>12.1f} vs {statistics.median(base_cpu):>6.1f} base "
            f"{cpu_ratio:>6.3f}   {statistics.median(r.rate for r in results):>6,.0f} vs "
            f"{statistics.median(r.rate for r in base):>6,.0f} {rate_ratio:>6.3f}   "
            f"{statistics.median(x for r in results for x in r.unloaded):>6.3f} vs "
            f"{statistics.median(x for r in base for x in r.unloaded):>6.3f}"
        )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * q) - 1)] if ordered else float("nan")


if __name__ == "__main__":
    sys.exit(main())
