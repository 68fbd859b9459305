"""The sealed audit log written by a real Kamailio (the adapter's multi-process log: workers spool,
the timer process chains and seals), and the attacks of issue 18 against it (docs/audit.md)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from policyplug.audit.seal import SealKey
from policyplug.audit.syslog import read_heads
from tests.audit_attacks import assert_attacks_found, copy_log, files_of, is_seal, read, verify_cli
from tests.servers.kamailio import KamailioServer
from tests.servers.rsyslog import RsyslogServer

POLICY = """\
policy "sealed-kamailio"
local domains ["acme.example"]
default deny "not permitted"

rule internal:
  on message
  when recipient.domain == "acme.example" && sender.user == "alice"
  deny "kept for the test"
"""

pytestmark = pytest.mark.slow


def keygen(folder: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "policyplug", "audit", "keygen", str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def send_messages(server: KamailioServer, count: int) -> set[str]:
    """`count` MESSAGEs from alice (each audited: the policy denies them); their Call-IDs."""
    call_ids = set()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        for i in range(count):
            call_id = uuid.uuid4().hex
            call_ids.add(call_id)
            body = f"message {i}"
            request = (
                f"MESSAGE sip:bob@acme.example SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{call_id}\r\nMax-Forwards: 70\r\n"
                f"From: <sip:alice@acme.example>;tag={i}\r\nTo: <sip:bob@acme.example>\r\n"
                f"Call-ID: {call_id}\r\nCSeq: 1 MESSAGE\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\n\r\n{body}"
            )
            sock.sendto(request.encode(), ("127.0.0.1", server.port))
    return call_ids


def wait_sealed(server: KamailioServer, call_ids: set[str], timeout: float = 15.0) -> None:
    """Until the records of these calls are in the log and a seal follows them (the timer seals them)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            records = [r for _, rs in read(server.audit_log) for r in rs] if server.audit_log.exists() else []
        except ValueError:  # a torn line not cut yet
            records = []
        ours = [
            r["seq"] for r in records if "event" in r and r["event"]["headers"].get("call-id") in call_ids
        ]
        if len(ours) == len(call_ids) and any(is_seal(r) and r["seq"] > max(ours) for r in records):
            return
        time.sleep(0.1)
    raise AssertionError(f"the log was not sealed within {timeout}s:\n{server.log_text()[-3000:]}")


def start(workdir: Path, key: Path, **extra: object) -> KamailioServer:
    server = KamailioServer(
        workdir,
        POLICY,
        children=2,
        extra_config={
            "audit_seal_key": str(key),
            "audit_seal_interval": 0.3,
            "audit_max_bytes": 8000,
            **extra,
        },
    )
    server.start()
    return server


def run_bursts(server: KamailioServer, bursts: int) -> int:
    for _ in range(bursts):
        wait_sealed(server, send_messages(server, 8))
    return 8 * bursts


def test_attacks_on_a_log_written_by_kamailio_are_found_with_the_key(tmp_path: Path) -> None:
    verification_key = keygen(tmp_path / "keys")
    key = tmp_path / "keys" / "seal.key"
    with RsyslogServer(tmp_path / "rsyslog") as collector:
        server = start(tmp_path / "k", key, audit_syslog=f"127.0.0.1:{collector.port}")
        try:
            total = run_bursts(server, 4)
            assert not server.python_errors(), server.python_errors()
        finally:
            server.stop()
        seals = sum(is_seal(r) for _, rs in read(server.audit_log) for r in rs)
        deadline = time.monotonic() + 10
        while len(read_heads(collector.output)) < seals and time.monotonic() < deadline:
            time.sleep(0.1)
    assert len(read_heads(collector.output)) == seals >= 4, "each seal's head reached the collector"
    with_heads = verify_cli(server.audit_log, verification_key, "--heads", str(collector.output))
    assert (
        with_heads.returncode == 0 and f"{seals} chain heads held off the host match" in with_heads.stdout
    ), with_heads.stdout + with_heads.stderr
    cut = copy_log(server.audit_log, tmp_path / "cut")  # the last file cut off, its seals with it
    files_of(cut)[-1].unlink()
    assert verify_cli(cut, verification_key, "--heads", str(collector.output)).returncode == 1
    assert len(list(server.audit_log.parent.glob("audit.jsonl.*"))) >= 1, "rotated"
    result = verify_cli(server.audit_log, verification_key)
    assert result.returncode == 0 and "sealed up to" in result.stdout, result.stdout + result.stderr
    records = [r for _, rs in read(server.audit_log) for r in rs]
    assert sum("decision" in r and r["event"]["from"] == "sip:alice@acme.example" for r in records) == total
    found = assert_attacks_found(server.audit_log, verification_key, key, tmp_path / "attacks")
    assert len(found) == 6


def test_kamailio_rolled_back_key_and_crash_repaired_tail(tmp_path: Path) -> None:
    verification_key = keygen(tmp_path / "keys")
    key = tmp_path / "keys" / "seal.key"
    server = start(tmp_path / "k", key)
    try:
        total = run_bursts(server, 2)
    finally:
        server.stop()
    # a crash left half a line (a worker killed in the middle of its write): the next start repairs it
    with server.audit_log.open("ab") as f:
        f.write(b'{"hash":"77aa","decision":{"decision":"al')
    backup = tmp_path / "seal.key.backup"
    shutil.copy2(key, backup)
    server = start(tmp_path / "k", key)
    try:
        total += run_bursts(server, 2)
    finally:
        server.stop()
    result = verify_cli(server.audit_log, verification_key)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "crash repair" in result.stdout
    assert SealKey.load(key).index > SealKey.load(backup).index + 1

    shutil.copy2(backup, key)  # the key file rolled back to an older copy
    server = start(tmp_path / "k", key)
    try:
        run_bursts(server, 1)
    finally:
        server.stop()
    assert "rolled back" in server.log_text()
    result = verify_cli(server.audit_log, verification_key)
    assert result.returncode == 1 and "rolled back" in result.stderr, result.stdout + result.stderr
    assert json.loads(server.audit_log.read_text().splitlines()[-1])["mark"]["kind"] == "seal"
