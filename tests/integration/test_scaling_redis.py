"""Shared `limit` windows in Redis (`serve --state redis://...`, docs/scaling.md), against a real redis-server."""

from __future__ import annotations

import multiprocessing
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from policyplug.limits import MemoryLimiter
from policyplug.state.redis_limiter import RedisLimiter
from tests.integration.scaling_helpers import Connection, Service
from tests.servers.redis import RedisServer

LIMIT_POLICY = """policy "shared"
local domains ["acme.example"]
default allow

rule flood:
  on message
  limit 5 per minute by sender.address
  deny "too many messages"
"""

PLAIN_POLICY = """policy "plain"
local domains ["acme.example"]
default deny "no"

rule internal:
  when direction == "internal"
  allow
"""


def message(sender: str, n: int, recipient: str = "bob@acme.example") -> dict:
    # the event's time drives the window: events a millisecond apart, well inside one minute
    return {
        "kind": "message",
        "from": sender,
        "to": recipient,
        "time": f"2026-12-01T10:00:{n // 1000:02d}.{n % 1000:03d}Z",
    }


def command_calls(server: RedisServer) -> dict[str, int]:
    stats = server.client().info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


def test_redis_windows_answer_as_in_process_windows(redis_server) -> None:  # type: ignore[no-untyped-def]
    """The same hits, in the same order: every answer equal to MemoryLimiter's (the reference)."""
    server = redis_server()
    shared = RedisLimiter(server.url)
    local = MemoryLimiter()
    rng = random.Random(21)
    now = 1_000_000.0
    for _ in range(600):
        now += rng.choice((0.001, 0.5, 3.0, 7.0, 20.0))
        key = rng.choice(("a", "b", "c\x00d", "é"))
        window, limit = rng.choice(((10.0, 3), (60.0, 5), (1.0, 1)))
        assert shared.hit(f"{window}{key}", now, window, limit) == local.hit(
            f"{window}{key}", now, window, limit
        )
    assert shared.stats["errors"] == 0 and shared.stats["hits"] == 600


def _hammer(
    url: str, start: multiprocessing.synchronize.Event, hits: int, queue: multiprocessing.Queue
) -> None:
    limiter = RedisLimiter(url)
    start.wait()
    allowed = sum(1 for i in range(hits) if not limiter.hit("one key", 5000.0 + i * 1e-6, 3600.0, 100))
    queue.put((allowed, limiter.stats["errors"]))


def test_windows_stay_exact_under_concurrent_clients(redis_server) -> None:  # type: ignore[no-untyped-def]
    """8 processes hit one window 60 times each at once: exactly `limit` hits are within it."""
    server = redis_server()
    context = multiprocessing.get_context("fork")
    start, queue = context.Event(), context.Queue()
    workers = [context.Process(target=_hammer, args=(server.url, start, 60, queue)) for _ in range(8)]
    for worker in workers:
        worker.start()
    start.set()
    results = [queue.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    assert sum(errors for _, errors in results) == 0
    assert sum(allowed for allowed, _ in results) == 100


def test_two_services_enforce_one_limit_and_plain_decisions_never_touch_redis(  # type: ignore[no-untyped-def]
    redis_server, tmp_path: Path
) -> None:
    server = redis_server()
    limited = tmp_path / "shared.policy"
    limited.write_text(LIMIT_POLICY)
    plain = tmp_path / "plain.policy"
    plain.write_text(PLAIN_POLICY)
    services = [Service(tmp_path / f"node{i}", limited, "--state", server.url) for i in (1, 2)]
    quiet = Service(tmp_path / "plain", plain, "--state", server.url)
    try:
        # a sender alternating between the two nodes gets the limit once, not twice
        answers = [
            services[n % 2].decide(message("mallory@acme.example", n))["decision"]["decision"]
            for n in range(12)
        ]
        assert answers == ["allow"] * 5 + ["deny"] * 7
        # another sender has a window of its own
        assert services[1].decide(message("alice@acme.example", 20))["decision"]["decision"] == "allow"
        for service in services:
            state = service.status()["state"]
            assert state["backend"] == "redis" and state["errors"] == 0 and state["hits"] > 0

        server.client().config_resetstat()
        before = command_calls(server)
        answers = quiet.ask_many([{"event": message(f"u{n}@acme.example", n)} for n in range(200)])
        assert {a["decision"]["decision"] for a in answers} == {"allow"}
        calls = command_calls(server)
        # only this test's own INFO calls: the 200 decisions without a `limit` sent Redis nothing
        assert set(calls) - set(before) <= {"info"} and calls.get("info", 0) == before.get("info", 0) + 1
        assert not {"evalsha", "eval", "zadd", "script|load"} & set(calls)
    finally:
        for service in (*services, quiet):
            service.stop()


@pytest.mark.parametrize("failure", ["closed", "open"])
def test_unreachable_redis_applies_the_operators_choice_and_recovers(  # type: ignore[no-untyped-def]
    redis_server, tmp_path: Path, failure: str
) -> None:
    server = redis_server()
    policy = tmp_path / "shared.policy"
    policy.write_text(LIMIT_POLICY)
    from tests.servers import free_port

    metrics_port = free_port()
    service = Service(
        tmp_path / "node",
        policy,
        "--state",
        server.url,
        "--state-failure",
        failure,
        "--metrics-port",
        str(metrics_port),
    )
    try:
        assert service.decide(message("carol@acme.example", 0))["decision"]["decision"] == "allow"
        server.stop()
        started = time.monotonic()
        answers = service.ask_many([{"event": message("carol@acme.example", n)} for n in range(1, 51)])
        took = time.monotonic() - started
        expected = "deny" if failure == "closed" else "allow"
        assert [a["decision"]["decision"] for a in answers] == [expected] * 50
        # one failed attempt, then the fail mode answers at once until the retry interval passes
        assert took < 5, took
        state = service.status()["state"]
        assert state["down"] and state["outages"] == 1 and state["errors"] >= 1
        assert state[f"failed_{failure}"] == 50
        assert "unreachable" in service.log_text() and f"limits fail {failure}" in service.log_text()
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as answer:
            metrics = answer.read().decode()
        assert "policyplug_state_down 1.0" in metrics
        assert f'policyplug_state_failed_limits{{mode="{failure}"}} 50.0' in metrics

        server.start()  # same port, empty: the service reconnects on its own
        deadline = time.monotonic() + 10
        while service.status()["state"]["down"]:
            assert time.monotonic() < deadline, "the service did not reconnect"
            service.decide(message("dave@acme.example", 0))
            time.sleep(0.2)
        state = service.status()["state"]
        assert state["recoveries"] == 1
        # windows count in Redis again: five allowed for a fresh sender, then denied
        answers = [service.decide(message("erin@acme.example", n))["decision"]["decision"] for n in range(7)]
        assert answers == ["allow"] * 5 + ["deny"] * 2
        assert "reachable again" in service.log_text()
    finally:
        service.stop()


def test_a_redis_restart_mid_load_loses_no_request(redis_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = redis_server()
    policy = tmp_path / "shared.policy"
    policy.write_text(LIMIT_POLICY)
    service = Service(tmp_path / "node", policy, "--state", server.url, "--state-failure", "open")
    try:
        answered = 0
        for batch in range(30):
            if batch == 10:
                server.restart()
            requests = [{"event": message(f"s{batch}-{n}@acme.example", n)} for n in range(50)]
            answers = service.ask_many(requests)
            assert all("decision" in a for a in answers), answers
            answered += len(answers)
        assert answered == 1500
        assert service.proc.poll() is None
        # the restart was absorbed by the retry on a new connection, or counted as a short outage
        state = service.status()["state"]
        assert state["hits"] + state["failed_open"] == 1500
    finally:
        service.stop()


KAMAILIO_POLICY = """policy "shared"
local domains ["acme.example"]
default deny "not permitted"

rule flood:
  on message
  limit 5 per minute by sender.address
  deny "too many messages"

rule to_partner:
  on message
  when recipient.domain == "partner.example"
  allow
"""


def test_two_services_and_a_two_worker_kamailio_enforce_one_limit(  # type: ignore[no-untyped-def]
    redis_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sender who alternates between two decision services and a Kamailio (two workers, each its
    own Python) gets the limit once: all three count in one Redis window."""
    from tests.servers.kamailio import KamailioServer
    from tests.sip_agent import SipAgent

    server = redis_server()
    policy = tmp_path / "shared.policy"
    policy.write_text(KAMAILIO_POLICY)
    partner = SipAgent("dave", "partner.example", ("127.0.0.1", 9))
    kamailio = KamailioServer(
        tmp_path / "kamailio",
        KAMAILIO_POLICY,
        children=2,
        routes={"partner.example": f"sip:127.0.0.1:{partner.port}"},
        extra_config={"state": server.url, "state_failure": "closed"},
    )
    if Path("/usr/lib/python3.11/ssl.py").exists():
        # Kamailio embeds Debian's libpython; where `python3` on PATH is another build of the same
        # version (pyenv), the embedded interpreter takes that build's standard library, whose
        # compiled modules (_ssl, which redis-py imports) do not link with Debian's libpython
        monkeypatch.setenv("PYTHONHOME", "/usr")
    kamailio.start()
    monkeypatch.delenv("PYTHONHOME", raising=False)
    services = [Service(tmp_path / f"node{i}", policy, "--state", server.url) for i in (1, 2)]
    mallory = SipAgent("mallory", "acme.example", ("127.0.0.1", kamailio.port))
    partner.proxy = ("127.0.0.1", kamailio.port)
    try:
        outcomes = []
        for n in range(15):
            if n % 3 == 0:
                response = mallory.request("MESSAGE", "sip:dave@partner.example", body=f"hello {n}")
                assert response is not None, f"no answer from Kamailio to message {n}"
                outcomes.append({200: "allow", 403: "deny"}[response.status])
            else:
                answer = services[n % 3 - 1].decide(
                    {"kind": "message", "from": "mallory@acme.example", "to": "dave@partner.example"}
                )
                outcomes.append(answer["decision"]["decision"])
        assert outcomes == ["allow"] * 5 + ["deny"] * 10, outcomes
        assert not kamailio.python_errors(), kamailio.python_errors()
    finally:
        mallory.close()
        partner.close()
        for service in services:
            service.stop()
        kamailio.stop()


def test_sentinel_url_finds_the_master(redis_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`--state redis+sentinel://SENTINEL/SERVICE/DB`: the windows live in the master the Sentinel names."""
    from tests.servers.redis import SentinelServer

    master = redis_server()
    sentinel = SentinelServer(tmp_path / "sentinel", master)
    sentinel.start()
    try:
        policy = tmp_path / "shared.policy"
        policy.write_text(LIMIT_POLICY)
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/policyplug/0"
        services = [Service(tmp_path / f"node{i}", policy, "--state", url) for i in (1, 2)]
        try:
            answers = [
                services[n % 2].decide(message("mallory@acme.example", n))["decision"]["decision"]
                for n in range(8)
            ]
            assert answers == ["allow"] * 5 + ["deny"] * 3
            assert any(k.startswith(b"policyplug:limit:") for k in master.client().keys("*"))
        finally:
            for service in services:
                service.stop()
    finally:
        sentinel.stop()
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "policyplug",
            "serve",
            str(policy),
            "--socket",
            str(tmp_path / "x.sock"),
            "--state",
            "redis+sentinel://127.0.0.1:1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "SERVICE" in bad.stderr and "Traceback" not in bad.stderr


def test_many_clients_on_several_services_get_one_exact_limit(redis_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Three services, four clients each, all sending for one sender at once: exactly `limit` allowed."""
    import threading

    server = redis_server()
    policy = tmp_path / "shared.policy"
    policy.write_text(LIMIT_POLICY.replace("limit 5 per minute", "limit 37 per minute"))
    services = [Service(tmp_path / f"node{i}", policy, "--state", server.url) for i in range(3)]
    clients = [services[n % 3].connect() for n in range(12)]
    outcomes: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(len(clients))

    def run(client: Connection, n: int) -> None:
        start.wait()
        answers = client.ask_many([{"event": message("mallory@acme.example", n * 20 + i)} for i in range(20)])
        with lock:
            outcomes.extend(a["decision"]["decision"] for a in answers)

    threads = [threading.Thread(target=run, args=(c, n)) for n, c in enumerate(clients)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert len(outcomes) == 240
        assert outcomes.count("allow") == 37 and outcomes.count("deny") == 203
    finally:
        for client in clients:
            client.close()
        for service in services:
            service.stop()


def test_a_hung_redis_costs_a_bounded_share_of_the_time(redis_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A Redis that accepts but never answers (stopped with SIGSTOP: every try waits for the timeout)
    stalls decisions only on the spaced-out tries, and is used again once it answers."""
    import signal

    server = redis_server()
    policy = tmp_path / "shared.policy"
    policy.write_text(LIMIT_POLICY)
    service = Service(tmp_path / "node", policy, "--state", server.url, "--state-failure", "open")
    try:
        assert service.decide(message("frank@acme.example", 0))["decision"]["decision"] == "allow"
        server.proc.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        answered = 0
        while time.monotonic() - started < 4:
            answers = service.ask_many(
                [{"event": message(f"g{answered + n}@acme.example", 1)} for n in range(20)]
            )
            answered += sum(1 for a in answers if a["decision"]["decision"] == "allow")
        state = service.status()["state"]
        # tries at about 0 s, 1 s and 3 s, each up to two timeouts (0.25 s and one retry)
        assert state["errors"] <= 4, state
        assert answered > 200, answered
        server.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 20
        while service.status()["state"]["down"]:
            assert time.monotonic() < deadline, "the service did not use Redis again"
            service.decide(message("henry@acme.example", 0))
            time.sleep(0.2)
    finally:
        if server.proc is not None:
            server.proc.send_signal(signal.SIGCONT)
        service.stop()


def test_sentinel_failover_moves_the_windows_to_the_new_master(redis_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The master dies; the Sentinel promotes the replica; the service finds it and counts there."""
    from tests.servers.redis import SentinelServer

    master = redis_server()
    replica = redis_server(extra=["--replicaof", "127.0.0.1", str(master.port)])
    sentinel = SentinelServer(tmp_path / "sentinel", master)
    sentinel.start()
    policy = tmp_path / "shared.policy"
    policy.write_text(LIMIT_POLICY)
    service = Service(
        tmp_path / "node",
        policy,
        "--state",
        f"redis+sentinel://127.0.0.1:{sentinel.port}/policyplug/0",
        "--state-failure",
        "open",
    )
    try:
        assert [
            service.decide(message("ivan@acme.example", n))["decision"]["decision"] for n in range(3)
        ] == ["allow"] * 3
        deadline = time.monotonic() + 30
        while not sentinel.client().execute_command("SENTINEL", "REPLICAS", "policyplug"):
            assert time.monotonic() < deadline, "the Sentinel did not find the replica"
            time.sleep(0.2)
        master.stop()
        deadline = time.monotonic() + 90
        n = 3
        while True:
            answer = service.decide(message(f"judy{n}@acme.example", 0))
            assert "decision" in answer
            state = service.status()["state"]
            # whether the client saw the master go (an outage counted) depends on when requests fell
            # in the failover; what must hold is that windows end up counted in the promoted replica
            if not state["down"] and replica.client().keys("policyplug:limit:*"):
                role = replica.client().info("replication")["role"]
                if role == "master":
                    break
            assert time.monotonic() < deadline, f"no failover seen: {state}"
            n += 1
            time.sleep(0.3)
        # windows count in the new master: a fresh sender gets exactly the limit
        answers = [service.decide(message("kim@acme.example", i))["decision"]["decision"] for i in range(7)]
        assert answers == ["allow"] * 5 + ["deny"] * 2
    finally:
        service.stop()
        sentinel.stop()
