"""The usage store in PostgreSQL (`--usage-db postgresql://...`, docs/scaling.md), against a real PostgreSQL."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from policyplug import Event, load_policy
from policyplug.usage.backends import open_usage_store
from policyplug.usage.postgres_store import SCHEMA_VERSION, PostgresUsageStore
from policyplug.usage.store import UsageStore
from tests.integration.scaling_helpers import Service
from tests.servers.postgres import PostgresServer

POLICY_TEXT = (
    'policy "u"\nlocal domains ["acme.example"]\ndefault deny "no"\n'
    'rule mark_external:\n  when direction != "internal"\n  tag "external"\n'
    'rule internal:\n  when direction == "internal"\n  allow\n'
    'rule partners:\n  when recipient.domain == "partner.example" || sender.domain == "partner.example"\n'
    '  allow\n  tag "partner"\n'
    'rule spam:\n  when sender.domain == "spam.example"\n  drop\n  tag "spam"\n'
)
POLICY = load_policy(text=POLICY_TEXT)

SENDERS = [
    "alice@acme.example",
    "bob@acme.example",
    "Zoë@acme.example",
    "x@spam.example",
    "d@partner.example",
    "carol@acme.example",
    "=2+5@evil.example",
    "e@evil.example",
]
RECIPIENTS = [
    "bob@acme.example",
    "d@partner.example",
    "e@evil.example",
    "alice@acme.example",
    "f@other.example",
]


def traffic(seed: int, count: int) -> list[dict]:
    rng = random.Random(seed)
    events = []
    for _ in range(count):
        hour = rng.choice(("2026-11-24T09", "2026-11-24T10", "2026-11-25T14"))
        events.append(
            {
                "kind": rng.choice(("message", "message", "presence", "groupchat")),
                "from": rng.choice(SENDERS),
                "to": rng.choice(RECIPIENTS),
                "time": f"{hour}:{rng.randrange(60):02d}:00Z",
            }
        )
    return events


def report(db: str, *options: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "policyplug", "report", "--db", db, *options],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def total(server: PostgresServer, table: str = "traffic") -> int:
    with server.connect() as db:
        return db.execute(f"SELECT coalesce(sum(count), 0) FROM {table}").fetchone()[0]


def test_two_services_report_once_and_as_sqlite_does(postgres_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Usage from two services lands in one PostgreSQL; the report equals, byte for byte, the SQLite
    store's report of the same traffic (text, CSV, HTML, with and without a period)."""
    server = postgres_server()
    policy = tmp_path / "u.policy"
    policy.write_text(POLICY_TEXT)
    nodes = [Service(tmp_path / f"node{i}", policy, "--usage-db", server.url) for i in (1, 2)]
    sqlite = tmp_path / "one.db"
    single = Service(tmp_path / "single", policy, "--usage-db", str(sqlite))
    events = traffic(21, 900)
    try:
        for i in range(0, len(events), 100):
            batch = [{"event": e} for e in events[i : i + 100]]
            nodes[(i // 100) % 2].ask_many(batch)
            single.ask_many(batch)
        assert nodes[0].status()["usage"]["backend"] == "postgresql"
    finally:
        for service in (*nodes, single):
            service.stop()  # closing writes the last batch
    assert total(server) == 900
    for options in (
        (),
        ("--format", "csv"),
        ("--since", "2026-11-24T10:00Z", "--until", "2026-11-25"),
        ("--top", "3", "--format", "csv"),
    ):
        from_postgres = report(server.url, *options)
        assert from_postgres == report(str(sqlite), *options), options
    assert "zoë@acme.example" in report(server.url, "--top", "20")  # non-ASCII survives the round trip
    pages = []
    for db, name in ((server.url, "pg.html"), (str(sqlite), "lite.html")):
        report(db, "--html", str(tmp_path / name), "--format", "text")
        pages.append((tmp_path / name).read_bytes())
    assert pages[0] == pages[1]


def test_concurrent_writers_lose_no_count(postgres_server) -> None:  # type: ignore[no-untyped-def]
    """Six stores (six nodes) add to the same rows at once, flushing every few ms: every count arrives."""
    server = postgres_server()
    stores = [PostgresUsageStore(server.url, flush_interval=0.005) for _ in range(6)]
    events = [Event.from_json(e) for e in traffic(7, 300)]
    decided = [(e, POLICY.decide(e), POLICY.activation(e)["direction"]) for e in events]

    def run(store: PostgresUsageStore) -> None:
        for _ in range(5):
            for event, decision, direction in decided:
                store.count(event, decision, direction)
            time.sleep(0.003)

    threads = [threading.Thread(target=run, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in stores:
        store.close()
        assert store.lost == 0
    assert total(server) == 6 * 5 * 300
    reference = UsageStore(Path(server.workdir) / "ref.db")  # the same counts, one writer, SQLite
    for _ in range(30):
        for event, decision, direction in decided:
            reference.count(event, decision, direction)
    reference.close()
    assert report(server.url, "--format", "csv") == report(
        str(Path(server.workdir) / "ref.db"), "--format", "csv"
    )


def test_schema_is_migrated_once_and_versioned(postgres_server) -> None:  # type: ignore[no-untyped-def]
    server = postgres_server()
    opened: list[PostgresUsageStore] = []
    threads = [
        threading.Thread(target=lambda: opened.append(PostgresUsageStore(server.url))) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in opened:
        store.close()
    assert len(opened) == 4
    with server.connect() as db:
        versions = db.execute("SELECT version FROM policyplug_schema ORDER BY version").fetchall()
        assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
        db.execute(
            "INSERT INTO policyplug_schema (version, description) VALUES (%s, 'from the future')",
            (SCHEMA_VERSION + 1,),
        )
    with pytest.raises(RuntimeError, match="newer than this policyplug"):
        open_usage_store(server.url)


def test_report_of_a_database_without_a_store_is_a_clear_error(postgres_server) -> None:  # type: ignore[no-untyped-def]
    server = postgres_server()
    result = subprocess.run(
        [sys.executable, "-m", "policyplug", "report", "--db", server.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "no usage store" in result.stderr and "Traceback" not in result.stderr
    gone = subprocess.run(
        [
            sys.executable,
            "-m",
            "policyplug",
            "report",
            "--db",
            f"postgresql://postgres:hunter2@127.0.0.1:{server.port + 1 if server.port < 65535 else 1}/x",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert gone.returncode == 1 and "Traceback" not in gone.stderr and "hunter2" not in gone.stderr
    policy = Path(server.workdir) / "u.policy"
    policy.write_text(POLICY_TEXT)
    serve = subprocess.run(
        [
            sys.executable,
            "-m",
            "policyplug",
            "serve",
            str(policy),
            "--socket",
            str(Path(server.workdir) / "s.sock"),
            "--usage-db",
            f"postgresql://postgres:hunter2@127.0.0.1:{server.port + 1 if server.port < 65535 else 1}/x",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert serve.returncode == 1 and "--usage-db" in serve.stderr and "Traceback" not in serve.stderr
    assert "hunter2" not in serve.stderr


def test_postgres_outage_keeps_counts_and_writes_them_when_back(  # type: ignore[no-untyped-def]
    postgres_server, tmp_path: Path
) -> None:
    server = postgres_server()
    policy = tmp_path / "u.policy"
    policy.write_text(POLICY_TEXT)
    node = Service(tmp_path / "node", policy, "--usage-db", server.url)
    try:
        events = traffic(3, 600)
        node.ask_many([{"event": e} for e in events[:200]])
        time.sleep(1.5)
        server.stop()
        answers = node.ask_many([{"event": e} for e in events[200:400]])
        assert all("decision" in a for a in answers), "decisions go on while PostgreSQL is away"
        deadline = time.monotonic() + 10
        while not node.status()["usage"]["down"]:
            assert time.monotonic() < deadline, "the outage was not noticed"
            time.sleep(0.2)
        status = node.status()["usage"]
        assert status["errors"] >= 1 and status["pending_rows"] > 0
        server.start()
        node.ask_many([{"event": e} for e in events[400:]])
        deadline = time.monotonic() + 15
        while node.status()["usage"]["down"] or node.status()["usage"]["pending_rows"]:
            assert time.monotonic() < deadline, "counts kept during the outage were not written"
            time.sleep(0.2)
        assert "counts are kept in memory" in node.log_text()
    finally:
        node.stop()
    assert total(server) == 600


def test_kamailio_workers_count_usage_into_postgres_at_any_audit_level(  # type: ignore[no-untyped-def]
    postgres_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Kamailio (audit level `none`) counts every decision into PostgreSQL (issue 19.11). A worker
    writes its tally with its first decision a second after the last write (it runs Python only
    while handling a request): one worker here, so the eleventh message writes all eleven."""
    from tests.servers.kamailio import KamailioServer
    from tests.sip_agent import SipAgent

    server = postgres_server()
    policy_text = (
        'policy "k"\nlocal domains ["acme.example"]\ndefault deny "no"\n'
        'rule partners:\n  when recipient.domain == "partner.example"\n  allow\n'
    )
    partner = SipAgent("dave", "partner.example", ("127.0.0.1", 9))
    kamailio = KamailioServer(
        tmp_path / "kamailio",
        policy_text,
        children=1,
        audit_level="none",
        routes={"partner.example": f"sip:127.0.0.1:{partner.port}"},
        extra_config={"usage_db": server.url},
    )
    if Path("/usr/lib/python3.11/ssl.py").exists():  # see test_scaling_redis: Kamailio's embedded stdlib
        monkeypatch.setenv("PYTHONHOME", "/usr")
    kamailio.start()
    monkeypatch.delenv("PYTHONHOME", raising=False)
    alice = SipAgent("alice", "acme.example", ("127.0.0.1", kamailio.port))
    partner.proxy = ("127.0.0.1", kamailio.port)
    try:
        statuses = [alice.request("MESSAGE", "sip:dave@partner.example", body=f"hi {n}") for n in range(6)]
        statuses += [alice.request("MESSAGE", "sip:eve@elsewhere.example", body="refused") for _ in range(4)]
        assert [r.status if r else None for r in statuses] == [200] * 6 + [403] * 4
        time.sleep(1.2)
        last = alice.request("MESSAGE", "sip:dave@partner.example", body="the one that writes")
        assert last is not None and last.status == 200
        assert total(server) == 11
        assert not kamailio.python_errors(), kamailio.python_errors()
    finally:
        alice.close()
        partner.close()
        kamailio.stop()
    text = report(server.url)
    assert "alice@acme.example" in text and "partner.example" in text and "elsewhere.example" in text
