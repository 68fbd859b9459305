#!/usr/bin/env python3
"""Decision service throughput and latency, through the Unix socket and through the XMPP component.

One run prints:
  - baseline: in-process `Event.from_json` + `policy.decide` on the same events (what the transports
    add overhead to), on the service's CPU;
  - socket, closed loop: decisions/s and latency percentiles with a window of requests in flight on one
    connection (a new request is sent when an answer comes back);
  - socket, open loop: requests sent on a fixed schedule (--rate per second, whatever the answers do),
    latency measured from each request's *scheduled* send time, so queueing in the service is not
    hidden by the client waiting (no coordinated omission). The goal of issue 4 is judged on this run:
    achieved rate >= --rate and p99 < 2 ms. Also printed: the client's worst send lag and p99 counted
    from when the client actually sent each request, which tell a stall of the client (this machine's
    virtual CPUs stop for up to tens of ms now and then) from one of the service;
  - component: decisions/s and latency of decision IQs sent by a slixmpp client through a real Prosody
    (skipped with a note when prosody is not installed),
with the audit log at level `all`, on the bundled example policy;
  - sealing (docs/audit.md): the audit writer's cost per record in-process, unsealed and sealed, and the
    closed-loop and open-loop socket runs with `--audit-seal-key` beside the same runs without it, in
    the same run (the service CPU per decision of the two tells the sealing cost per record).

"On one core": the service runs pinned to one CPU (sched_setaffinity before exec, so every thread of
it, the audit writer included, shares that CPU) and this client to another one, so the client does not
steal the service's core. Both run SCHED_FIFO (or nice -10 where that is not allowed), because this
machine is shared with other jobs that would otherwise take turns on those CPUs: the figures are those
of a service with a core of its own. Prosody, in the component run, shares the client's CPU.

    python3 bench/bench_service.py [--rate 20000] [--duration 5] [--windows 16,64] [--iq-requests 3000]

`--record-compare CHECKOUT` runs only closed-loop runs with an audit log (level all) and a usage store,
alternating CHECKOUT's policyplug (a `git archive` of another commit, say) and this one's, and prints
the service CPU per decision of each (how recording a decision changed; 2026-12-07, the service
recording through PolicyHost.record against writing it out inline: 18.60 vs 18.70 µs, median of 7
runs of 100,000 decisions, i.e. no difference at this resolution of 0.1 µs).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from policyplug import Event, load_policy  # noqa: E402
from tests.servers import service_status  # noqa: E402

POLICY = ROOT / "policyplug" / "demo" / "acme" / "acme.policy"
EVENTS = [json.loads(p.read_text()) for p in sorted((ROOT / "policyplug" / "demo" / "events").glob("*.json"))]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def cpus() -> tuple[int, int]:
    """(service CPU, client CPU): the first two CPUs this process may use."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        raise SystemExit("need two CPUs: one for the service, one for the client")
    return allowed[0], allowed[1]


def dedicate(cpu: int) -> None:
    """Pin the calling process to `cpu` and give it that CPU before any ordinary process.

    This machine is shared with other jobs (test suites of other work) that would otherwise take turns
    on the service's CPU: the service and the client run SCHED_FIFO (priority 10; the kernel still keeps
    5% of each second for others), or at nice -10 where real-time scheduling is not allowed.
    """
    os.sched_setaffinity(0, {cpu})
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except PermissionError:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, -10)
        except PermissionError:
            pass


def scheduling() -> str:
    if os.sched_getscheduler(0) == os.SCHED_FIFO:
        return f"SCHED_FIFO {os.sched_getparam(0).sched_priority}"
    return f"nice {os.getpriority(os.PRIO_PROCESS, 0)}"


def baseline(count: int, cpu: int) -> tuple[float, float]:
    own = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})  # on the service's CPU, like the service (and at its priority: main)
    try:
        policy = load_policy(POLICY)
        started = time.perf_counter()
        for i in range(count):
            policy.decide(Event.from_json(EVENTS[i % len(EVENTS)]))
        elapsed = time.perf_counter() - started
    finally:
        os.sched_setaffinity(0, own)
    return count / elapsed, elapsed / count * 1e6


def start_service(
    workdir: Path,
    cpu: int,
    *extra: str,
    audit_dir: Path | None = None,
    seal_interval: float | None = None,
    tree: Path | None = None,
) -> subprocess.Popen[str]:
    """`policyplug serve` on the bundled policy, audit level all; `tree`: a checkout whose policyplug
    runs instead of this one's (--record-compare)."""
    sock = workdir / "pp.sock"
    if sock.exists():
        sock.unlink()
    audit_log = (audit_dir or workdir) / "audit.jsonl"
    if audit_log.exists():
        audit_log.unlink()
    if seal_interval is not None:  # a fresh key for a fresh log
        keys = Path(tempfile.mkdtemp(dir=workdir))
        from policyplug.audit.seal import keygen

        keygen(keys)
        extra = (
            *extra,
            "--audit-seal-key",
            str(keys / "seal.key"),
            "--audit-seal-interval",
            str(seal_interval),
        )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "policyplug",
            "serve",
            str(POLICY),
            "--socket",
            str(sock),
            "--audit-log",
            str(audit_log),
            "--audit-level",
            "all",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: dedicate(cpu),
        env=os.environ if tree is None else {**os.environ, "PYTHONPATH": str(tree)},
        cwd=tree,
    )
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"service did not start: {proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.05)
    return proc


def filesystem(path: Path) -> str:
    """The type of the filesystem `path` is on (from /proc/mounts: the longest mount point above it)."""
    best, kind = "", "unknown"
    resolved = str(path.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if (
            len(fields) > 2
            and (resolved == fields[1] or resolved.startswith(fields[1].rstrip("/") + "/"))
            and len(fields[1]) >= len(best)
        ):
            best, kind = fields[1], f"{fields[2]} on {fields[0]}"
    return kind


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_service(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


def request_lines(count: int) -> list[bytes]:
    """Pre-encoded requests, so encoding costs the client nothing while measuring."""
    return [orjson.dumps({"id": i, "event": EVENTS[i % len(EVENTS)]}) + b"\n" for i in range(count)]


def answer_ids(complete: list[bytes]) -> list[int]:
    """Ids of decision answers, read cheaply: answers start with {"id":N,"decision": (checked)."""
    ids = []
    for line in complete:
        comma = line.index(b",", 6)
        if not line.startswith(b'{"id":') or not line.startswith(b'"decision":', comma + 1):
            raise SystemExit(f"not a decision answer: {line[:200]!r}")
        ids.append(int(line[6:comma]))
    return ids


def read_some(client: socket.socket, into: bytearray) -> bytes:
    """recv into a buffer allocated once: recv(1 MiB) allocates (mmap) and frees a MiB per read."""
    count = client.recv_into(into)
    return bytes(memoryview(into)[:count])


def bench_closed(workdir: Path, count: int, window: int) -> tuple[float, list[float]]:
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(workdir / "pp.sock"))
    lines = request_lines(count)
    read_buffer = bytearray(1 << 20)
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
        buffer += read_some(client, read_buffer)
        *complete, buffer = buffer.split(b"\n")
        now = time.perf_counter()
        for i in answer_ids(complete):
            latencies.append((now - sent_at.pop(i)) * 1000)
    elapsed = time.perf_counter() - started
    client.close()
    return count / elapsed, latencies


STALL_PROBE = """
import json, os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
try:
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(20))  # above the service: only the host stops it
except PermissionError:
    pass
end = time.perf_counter() + float(sys.argv[2])
stops = []
previous = time.perf_counter()
while previous < end:
    time.sleep(0.001)
    now = time.perf_counter()
    # from one wake-up to the next, not from the sleep call: a stop while this probe itself runs (seen:
    # 10 ms inside its own timer set-up) counts too
    if now - previous > 0.002:
        stops.append((previous, now))
    previous = now
gaps = [(b - a - 0.001) * 1000 for a, b in stops]
print(json.dumps({"max_ms": max(gaps, default=0.0), "over_5ms": sum(g > 5 for g in gaps),
                  "stopped_ms": sum(gaps), "stops": stops}))
"""


HOST_STOP_LIMIT_MS = 5.0


def stall_probe(cpu: int, seconds: float) -> subprocess.Popen[str]:
    """Watch `cpu` for `seconds`: a process at a real-time priority above the service's sleeps 1 ms at a
    time and notes how late it wakes. Nothing in this machine may delay it, so a late wake-up means the
    virtual CPU itself was stopped by the host (seen here: 10-150 ms, several times a minute at busy
    times). Costs the service about 1% of its CPU."""
    return subprocess.Popen(
        [sys.executable, "-c", STALL_PROBE, str(cpu), str(seconds)], stdout=subprocess.PIPE, text=True
    )


def bench_open(workdir: Path, rate: float, duration: float, warmup: float, tick: float) -> dict[str, float]:
    """Send request i at t0 + i/rate, whatever the answers do; all requests due are sent together,
    one send per `tick` at most (so a request waits up to `tick` in the client, counted in its latency).

    Latency of request i = time its answer was read - its scheduled time, so a service that falls
    behind shows the whole queueing delay. Requests scheduled during the warm-up are answered but not
    counted. The socket is non-blocking: the client never stops reading while it has to send.
    """
    total = int(rate * (warmup + duration))
    skip = int(rate * warmup)
    lines = request_lines(total)
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(workdir / "pp.sock"))
    client.setblocking(False)
    # select(2), not epoll: epoll_wait counts its timeout in whole milliseconds (Python rounds up), so
    # waits of 0.05-0.2 ms became 1 ms sleeps, requests went out in 1 ms lumps and each waited up to a
    # millisecond in this client before it was sent (p50 ~0.7 ms at any rate). select() waits in µs.
    selector = selectors.SelectSelector()
    selector.register(client, selectors.EVENT_READ)
    # Preallocated, and filled with the one float object made per read: while measuring, the client makes
    # no new objects per answer (a list of 100,000 fresh floats and tuples cost it page faults, ~4 µs each
    # on this VM, in bursts: its own stalls would have counted as the service's latency)
    handed = [0.0] * total  # when the client actually sent each request
    read_buffer = bytearray(1 << 20)
    answered_at = [0.0] * total
    answered = 0
    outbox = b""
    sent = 0  # requests handed to outbox
    max_send_lag = 0.0  # how much later than its tick the client sent a request (client hiccups)
    last_send = 0.0
    buffer = b""
    interval = 1.0 / rate
    t0 = time.perf_counter() + 0.01
    first_answer: float | None = None  # when the first counted answer was read
    last_answer = t0
    deadline = t0 + warmup + duration + 10  # a service that cannot keep up still gets 10 s to drain
    while answered < total:
        now = time.perf_counter()
        if now > deadline:
            raise SystemExit(f"open loop: only {answered} of {total} answers after the schedule + 10 s")
        due = min(total, int((now - t0) * rate) + 1) if now >= t0 else 0
        if due > sent and now >= last_send + tick:
            max_send_lag = max(max_send_lag, now - (t0 + sent * interval) - tick)
            outbox += b"".join(lines[sent:due])
            for i in range(sent, due):
                handed[i] = now
            sent = due
            last_send = now
        if outbox:
            try:
                written = client.send(outbox)
                outbox = outbox[written:]
            except BlockingIOError:
                pass
        if sent < total:  # until the next request is due, but one send per tick at most
            wait = max(0.0, max(t0 + sent * interval, last_send + tick) - time.perf_counter())
        else:
            wait = 0.05
        if outbox:
            selector.modify(client, selectors.EVENT_READ | selectors.EVENT_WRITE)
        for _key, mask in selector.select(wait):
            if mask & selectors.EVENT_READ:
                chunk = read_some(client, read_buffer)
                if not chunk:
                    raise SystemExit("service closed the connection")
                received = time.perf_counter()
                buffer += chunk
                *complete, buffer = buffer.split(b"\n")
                for i in answer_ids(complete):
                    answered_at[i] = received
                answered += len(complete)
                if complete and first_answer is None and answered > skip:
                    first_answer = received
                last_answer = received
        if not outbox:
            selector.modify(client, selectors.EVENT_READ)
    client.close()
    # steady-state throughput: answers per second between the first and the last counted answer
    spans = [(t0 + i * interval, answered_at[i]) for i in range(skip, total)]  # (scheduled, answered)
    latencies = [(answered - scheduled) * 1000 for scheduled, answered in spans]
    from_send = [(answered_at[i] - handed[i]) * 1000 for i in range(skip, total)]
    achieved = (len(latencies) - 1) / (last_answer - first_answer) if first_answer else 0.0
    return {
        "offered": rate,
        "achieved": achieved,
        "count": len(latencies),
        "p50": percentile(latencies, 0.5),
        "p90": percentile(latencies, 0.9),
        "p99": percentile(latencies, 0.99),
        "p999": percentile(latencies, 0.999),
        "max": max(latencies),
        "send_lag_ms": max_send_lag * 1000,
        "p99_from_send": percentile(from_send, 0.99),
        "spans": spans,
    }


def clear_of_stops(spans: list[tuple[float, float]], stops: list[tuple[float, float]]) -> list[float]:
    """Latencies (ms) of the requests that were not in flight while a probe saw its CPU stopped."""
    import bisect

    stops = sorted(stops)
    starts = [start for start, _ in stops]
    kept = []
    for scheduled, answered in spans:
        # a stop overlaps [scheduled, answered] if it starts before the answer and ends after the schedule
        index = bisect.bisect_left(starts, answered)
        if not any(end > scheduled for _, end in stops[max(0, index - 8) : index]):
            kept.append((answered - scheduled) * 1000)
    return kept


def bench_component(
    workdir: Path, count: int, window: int, service_cpu: int
) -> tuple[float, list[float]] | str:
    if not shutil.which("prosody"):
        return "prosody is not installed: component figures skipped"
    from slixmpp.xmlstream import ET

    from tests.servers.prosody import ProsodyServer
    from tests.xmpp_client import TestClient

    server = ProsodyServer(
        workdir / "prosody",
        components={"policy.acme.example": "s3cret"},
        global_options={"limits": {"c2s": {"rate": "100mb/s"}}},
    )
    server.start()  # inherits this client's CPU
    server.register("bench", "acme.example", "pw")
    service = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "policyplug",
            "serve",
            str(POLICY),
            "--component",
            "policy.acme.example",
            "--secret",
            "s3cret",
            "--server",
            f"127.0.0.1:{server.component_port}",
            "--socket",
            str(workdir / "c.sock"),
            "--component-client",
            "bench@acme.example",  # asks as a user: allow it
            "--audit-log",
            str(workdir / "c-audit.jsonl"),
            "--audit-level",
            "all",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: dedicate(service_cpu),
    )
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


class collector_quiet:
    """The client's garbage collector off while it measures (its garbage is acyclic; refcounting frees
    it). The baseline loaded a policy into this process: a full collection walking those ~50,000
    objects stalled the client for 10-15 ms, and every request due meanwhile counted that as latency."""

    def __enter__(self) -> None:
        gc.collect()
        gc.freeze()
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        gc.enable()
        gc.unfreeze()


def writer_costs(count: int, seal_interval: float, rate: float) -> None:
    """The audit writer's own cost (ChainedLog, in this process, no service around it, fsyncs of the
    records left out): per record without a sealer and with one (which only counts records between
    seals), alternating, and per seal (the seal record, the log's fsync, the key file written,
    fsynced and renamed, the folder fsynced). Sealing's cost per record at `rate` records/s is the
    per-record difference plus one seal's cost over rate x interval records."""
    from policyplug.audit.log import ChainedLog
    from policyplug.audit.record import encode_decision, encode_event, policy_part
    from policyplug.audit.seal import Sealer, keygen

    policy = load_policy(POLICY)
    items = []
    for i in range(256):
        event = Event.from_json(EVENTS[i % len(EVENTS)])
        decision, name, revision = encode_decision(policy.decide(event))
        items.append((encode_event(event, False), decision, policy_part(name, revision)))
    batch = 100  # what a 5 ms batch holds at 20,000 records/s
    per_record: dict[str, list[float]] = {"unsealed": [], "sealed": []}
    seal_ms: list[float] = []
    seal_cpu_ms: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(6):
            label = ("unsealed", "sealed")[run % 2]
            folder = Path(tmp) / str(run)
            sealer = None
            if label == "sealed":
                keygen(folder / "k")
                sealer = Sealer(folder / "k" / "seal.key", interval=1e9)
            chained = ChainedLog(folder / "audit.jsonl", node="bench", flush_interval=1e9, sealer=sealer)
            chained.sync_if_due = lambda force=False: None  # type: ignore[method-assign]  # the writer's own work
            started = time.process_time()
            for k in range(0, count, batch):
                chained.append([items[(k + j) % 256] for j in range(batch)])
            per_record[label].append((time.process_time() - started) / count * 1e6)
            if sealer is not None:
                for _ in range(20):
                    chained.append(items[:1])
                    started, cpu_started = time.perf_counter(), time.process_time()
                    chained.seal_if_due(force=True)
                    seal_ms.append((time.perf_counter() - started) * 1000)
                    seal_cpu_ms.append((time.process_time() - cpu_started) * 1000)
            chained.close()
    unsealed, sealed = statistics.median(per_record["unsealed"]), statistics.median(per_record["sealed"])
    one_seal = statistics.median(seal_cpu_ms)
    amortised = one_seal * 1000 / (rate * seal_interval)
    print(
        f"writer    in-process, per record (CPU, median of 3): unsealed {unsealed:.3f} µs, sealed {sealed:.3f} µs "
        f"({sealed - unsealed:+.3f}); one seal: {one_seal:.3f} ms CPU, {statistics.median(seal_ms):.2f} ms wall "
        f"(median of 60; wall max {max(seal_ms):.2f} ms: three fsyncs the writer thread waits for, without the GIL)"
    )
    print(
        f"sealing   cost per record at {rate:,.0f} records/s, a seal every {seal_interval:g} s: "
        f"{max(sealed - unsealed, 0):.3f} + {amortised:.3f} = {max(sealed - unsealed, 0) + amortised:.3f} µs "
        f"(goal: at most 1 µs; the service's default interval is 60 s)"
    )


def record_compare(
    base: Path, workdir: Path, cpu: int, requests: int, window: int, rounds: int, audit_dir: Path | None
) -> None:
    """Service CPU per decision with an audit log (level all) and a usage store, of the checkout `base`
    and of this one, alternating (so both see the same load on the host): what recording a decision
    costs the one against the other."""
    cpu_of: dict[str, list[float]] = {"base": [], "this": []}
    for _round in range(rounds):
        for label, tree in (("base", base), ("this", ROOT)):
            with tempfile.TemporaryDirectory(dir=audit_dir) as audit_tmp:
                proc = start_service(
                    workdir,
                    cpu,
                    "--usage-db",
                    str(Path(audit_tmp) / "usage.db"),
                    audit_dir=Path(audit_tmp),
                    tree=tree,
                )
                try:
                    cpu_before = cpu_seconds(proc.pid)
                    with collector_quiet():
                        rate, latencies = bench_closed(workdir, requests, window)
                    used = (cpu_seconds(proc.pid) - cpu_before) / requests * 1e6
                finally:
                    stop_service(proc)
            cpu_of[label].append(used)
            print(
                f"record    closed loop, {window:>3} in flight, {label:>4} ({tree}): {rate:>9,.0f} decisions/s  "
                f"p99 {percentile(latencies, 0.99):.3f} ms  service CPU {used:.2f} µs/decision",
                flush=True,
            )
    this, was = statistics.median(cpu_of["this"]), statistics.median(cpu_of["base"])
    print(
        f"record    service CPU per decision, audit (all) + usage store, median of {rounds}: this {this:.2f} - "
        f"base {was:.2f} = {this - was:+.2f} µs/decision"
    )


def judge_open_loop(
    args: argparse.Namespace,
    workdir: Path,
    audit_dir: Path,
    service_cpu: int,
    client_cpu: int,
    seal_interval: float | None = None,
) -> bool | None:
    """Open-loop attempts with the audit log in `audit_dir`; the verdict on the goal (None: not judged)."""
    where = filesystem(audit_dir) + (f", sealed every {seal_interval:g} s" if seal_interval else "")
    print(f"audit log in {audit_dir} ({where}), fsynced every 200 ms")
    # The goal is judged on the first open-loop run during which the host did not stop the service's
    # CPU for more than HOST_STOP_LIMIT_MS (a stopped CPU answers nothing, whatever runs on it; stops of
    # 2-3 ms are this machine's everyday jitter, 10-150 ms ones happen at busy times); every attempt is printed.
    verdict = None
    for attempt in range(1, args.attempts + 1):
        proc = start_service(workdir, service_cpu, audit_dir=audit_dir, seal_interval=seal_interval)
        try:
            cpu_before = cpu_seconds(proc.pid)
            probe = stall_probe(service_cpu, args.duration + args.warmup + 3)  # past the last answer
            client_probe = stall_probe(client_cpu, args.duration + args.warmup + 3)  # past the last answer
            with collector_quiet():
                result = bench_open(workdir, args.rate, args.duration, args.warmup, args.tick)
            cpu = (cpu_seconds(proc.pid) - cpu_before) / (args.rate * (args.duration + args.warmup)) * 1e6
            stalls = json.loads(probe.communicate(timeout=60)[0])
            client_stalls = json.loads(client_probe.communicate(timeout=60)[0])
            audit_stats = service_status(workdir / "pp.sock")["audit"] or {}
        finally:
            stop_service(proc)
        met = result["achieved"] >= args.rate * 0.995 and result["p99"] < 2.0
        host_stopped = stalls["max_ms"] > HOST_STOP_LIMIT_MS
        print(
            f"socket    open loop #{attempt}, offered {args.rate:,.0f}/s for {args.duration:g} s "
            f"(+{args.warmup:g} s warm-up), a send every {args.tick * 1000:g} ms: {result['achieved']:>9,.0f} "
            f"decisions/s  p50 {result['p50']:.3f} ms  p90 {result['p90']:.3f} ms  p99 {result['p99']:.3f} ms  "
            f"p99.9 {result['p999']:.3f} ms  max {result['max']:.3f} ms  (service CPU {cpu:.1f} µs/decision; "
            f"client send lag max {result['send_lag_ms']:.2f} ms; p99 from the actual send "
            f"{result['p99_from_send']:.3f} ms; service CPU stopped by the host: longest "
            f"{stalls['max_ms']:.1f} ms, {stalls['over_5ms']} times > 5 ms, {stalls['stopped_ms']:.0f} ms in all; "
            f"the client's CPU: longest {client_stalls['max_ms']:.1f} ms, {client_stalls['stopped_ms']:.0f} ms in all; "
            f"audit: {audit_stats.get('written', 0):,} records, {audit_stats.get('syncs', 0)} fsyncs"
            + (f", {audit_stats['seal']['seals']} seals" if audit_stats.get("seal") else "")
            + ")"
        )
        clear = clear_of_stops(result["spans"], stalls["stops"] + client_stalls["stops"])
        if clear:
            print(
                f"          requests not in flight while the host stopped either CPU for > 1 ms: "
                f"{len(clear) / len(result['spans']):.1%}, their p99 {percentile(clear, 0.99):.3f} ms, "
                f"max {max(clear):.3f} ms"
            )
        if not host_stopped:
            verdict = met
            break
        print(
            f"          attempt {attempt} does not count: the host stopped the service's CPU "
            f"for {stalls['max_ms']:.1f} ms"
        )
    # the answered rate, measured between the first and the last answer, jitters by ~0.3% around the offered one
    print(
        f"goal      audit log on {where}: {args.rate:,.0f}/s offered, answered within 0.5% of it, p99 < 2 ms (open loop): "
        + (
            "MET"
            if verdict
            else "NOT MET"
            if verdict is not None
            else f"NOT JUDGED (the host stopped the service's CPU in all {args.attempts} attempts)"
        )
    )
    return verdict


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=50_000, help="requests per closed-loop run")
    parser.add_argument(
        "--windows", default="16,64", help="requests in flight, closed loop (comma-separated)"
    )
    parser.add_argument(
        "--rate", type=float, default=20_000, help="offered rate of the open-loop run (per s)"
    )
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds of the open-loop run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of the open-loop run not counted")
    parser.add_argument(
        "--tick",
        type=float,
        default=0.0002,
        help="open loop: shortest time between two sends (s); requests due meanwhile go together",
    )
    parser.add_argument(
        "--attempts",
        type=int,
        default=3,
        help="open-loop runs at most, until one where the host did not stop the service's CPU",
    )
    parser.add_argument("--iq-requests", type=int, default=3000)
    parser.add_argument("--iq-window", type=int, default=32)
    parser.add_argument("--no-component", action="store_true", help="skip the Prosody run")
    parser.add_argument(
        "--audit-dir",
        type=Path,
        default=None,
        help="directory for the audit log (default: a temporary directory on this machine's disk); "
        "/dev/shm takes the disk's flushes out of the run",
    )
    parser.add_argument(
        "--seal-interval",
        type=float,
        default=0.25,
        help="--audit-seal-interval of the sealed runs (s; the service's default is 60)",
    )
    parser.add_argument(
        "--seal-rounds",
        type=int,
        default=2,
        help="closed-loop runs of each kind (unsealed, sealed), alternating",
    )
    parser.add_argument(
        "--writer-records",
        type=int,
        default=200_000,
        help="records of the in-process audit writer measurement",
    )
    parser.add_argument(
        "--record-compare",
        type=Path,
        metavar="CHECKOUT",
        help="only compare the service CPU per decision (audit log and usage store) of CHECKOUT's "
        "policyplug with this one's, in alternating closed-loop runs",
    )
    parser.add_argument("--rounds", type=int, default=5, help="--record-compare: runs of each")
    args = parser.parse_args()
    service_cpu, client_cpu = cpus()
    dedicate(client_cpu)
    if args.record_compare is not None:
        with tempfile.TemporaryDirectory() as tmp:
            window = int(args.windows.split(",")[0])
            record_compare(
                args.record_compare.resolve(),
                Path(tmp),
                service_cpu,
                args.requests,
                window,
                args.rounds,
                args.audit_dir,
            )
        return 0
    print(
        f"service pinned to CPU {service_cpu}, benchmark client (and Prosody) to CPU {client_cpu}, both "
        f"{scheduling()} (ahead of other jobs on this machine); audit level all"
    )
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        rate, per = baseline(args.requests, service_cpu)
        print(
            f"baseline  in-process decide (incl. event parsing):   {rate:>9,.0f} decisions/s  {per:6.2f} µs each"
        )
        writer_costs(args.writer_records, args.seal_interval, args.rate)
        for window in (int(w) for w in args.windows.split(",") if w.strip()):
            cpu_of: dict[str, list[float]] = {"unsealed": [], "sealed": []}
            for _round in range(args.seal_rounds):  # alternating, so that both see the same load on the host
                for label, interval in (("unsealed", None), ("sealed", args.seal_interval)):
                    with tempfile.TemporaryDirectory(dir=args.audit_dir) as audit_tmp:
                        proc = start_service(
                            workdir, service_cpu, audit_dir=Path(audit_tmp), seal_interval=interval
                        )
                        try:
                            cpu_before = cpu_seconds(proc.pid)
                            with collector_quiet():
                                rate, latencies = bench_closed(workdir, args.requests, window)
                            cpu = (cpu_seconds(proc.pid) - cpu_before) / args.requests * 1e6
                        finally:
                            stop_service(proc)
                        # seals in the log, the one written at the stop included
                        seals = (
                            sum(
                                path.read_bytes().count(b'"kind":"seal"')
                                for path in Path(audit_tmp).glob("audit.jsonl*")
                            )
                            if interval
                            else None
                        )
                    cpu_of[label].append(cpu)
                    print(
                        f"socket    closed loop, {window:>3} in flight, {label:>8}:    {rate:>9,.0f} decisions/s  "
                        f"p50 {percentile(latencies, 0.5):.3f} ms  p99 {percentile(latencies, 0.99):.3f} ms  "
                        f"(service CPU {cpu:.1f} µs/decision"
                        + (f", {seals} seals in the log" if seals is not None else "")
                        + ")"
                    )
            sealed, unsealed = statistics.median(cpu_of["sealed"]), statistics.median(cpu_of["unsealed"])
            print(
                f"sealing   closed loop, {window:>3} in flight: service CPU median sealed {sealed:.2f} - unsealed "
                f"{unsealed:.2f} = {sealed - unsealed:+.2f} µs/decision (every decision is a record; noise of this "
                f"shared machine included)"
            )
        # On this machine each fsync of the virtual disk stops both virtual CPUs for 2-4 ms when they are busy
        # (docs/benchmarks.md): the goal is judged with the log on the disk and, to tell the service from
        # the disk, on tmpfs (fsync is still called, and returns at once)
        locations = (
            [args.audit_dir]
            if args.audit_dir is not None
            else [None] + ([Path("/dev/shm")] if Path("/dev/shm").is_dir() else [])
        )
        for location in locations:
            for interval in (None, args.seal_interval):
                with tempfile.TemporaryDirectory(dir=location) as audit_tmp:
                    judge_open_loop(
                        args, workdir, Path(audit_tmp), service_cpu, client_cpu, seal_interval=interval
                    )
        if not args.no_component:
            component = bench_component(workdir, args.iq_requests, args.iq_window, service_cpu)
            if isinstance(component, str):
                print(f"component {component}")
            else:
                rate, latencies = component
                print(
                    f"component via Prosody, closed loop, {args.iq_window:>3} in flight: {rate:>9,.0f} decisions/s  "
                    f"p50 {percentile(latencies, 0.5):.3f} ms  p99 {percentile(latencies, 0.99):.3f} ms"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
