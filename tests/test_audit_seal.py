"""Sealed audit logs (docs/audit.md): keygen, forward-secure seals, crash repair, per-process chains,
and the attacks of issue 18 against logs written by the real `policyplug serve` over its socket."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from policyplug import Event, load_policy
from policyplug.audit import AuditWriter, verify
from policyplug.audit.multiprocess_log import SharedAuditLog
from policyplug.audit.seal import SealKey, parse_verification_key
from tests.audit_attacks import assert_attacks_found, is_seal, read, verify_cli

POLICY_TEXT = """policy "sealed"
local domains ["acme.example"]
default deny "no"

rule internal:
  when direction == "internal"
  allow
"""
POLICY = load_policy(text=POLICY_TEXT)


def keygen(folder: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "policyplug", "audit", "keygen", str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, "keygen prints the verification key, one line, on stdout"
    parse_verification_key(lines[0])
    return lines[0]


def test_keygen_and_the_key_advancing_leaves_no_old_key_on_disk(tmp_path: Path) -> None:
    verification_key = keygen(tmp_path / "keys")
    key_file = tmp_path / "keys" / "seal.key"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert (
        subprocess.run(
            [sys.executable, "-m", "policyplug", "audit", "keygen", str(tmp_path / "keys")],
            capture_output=True,
            timeout=60,
        ).returncode
        == 1
    ), "an existing key is not overwritten"
    k0 = parse_verification_key(verification_key)
    key = SealKey.load(key_file)
    assert (key.key, key.index) == (k0, 0)
    key.advance()
    again = SealKey.load(key_file)
    assert again.index == 1 and again.key != k0
    assert os.listdir(tmp_path / "keys") == ["seal.key"], "no temporary or old key file is left"
    assert k0.hex() not in key_file.read_text()
    # a crash while the key was replaced left a temporary file holding the next key: the sealer removes it
    stale = tmp_path / "keys" / ".seal.key.4242.tmp"
    stale.write_text(key_file.read_text())
    from policyplug.audit.seal import Sealer

    sealer = Sealer(key_file, 1.0)
    assert stale.exists(), "read lazily, by the process that seals"
    assert sealer.key.index == 1 and not stale.exists()


def _write(log: Path, count: int, **options: object) -> AuditWriter:
    writer = AuditWriter(log, level="all", **options)  # type: ignore[arg-type]
    for i in range(count):
        event = Event.message(f"u{i}@acme.example", "x@partner.example")
        writer.submit(event, POLICY.decide(event))
    return writer


def test_a_torn_tail_is_cut_at_start_with_a_repair_record_and_verifies(tmp_path: Path) -> None:
    """Issue 16.6: the restarted writer appended after the torn line, and verify said tampered."""
    log = tmp_path / "audit.jsonl"
    _write(log, 5, background=False).close()
    whole = log.read_bytes()
    torn = whole.splitlines(keepends=True)[2][:57]
    with log.open("ab") as f:
        f.write(torn)  # what a crash in the middle of a write leaves
    assert verify([str(log)]).truncated_tail
    _write(log, 3, background=False).close()
    assert log.read_bytes().startswith(whole), "what was whole stays as it was"
    result = verify([str(log)])
    assert result.intact and result.records == 9 and not result.truncated_tail, result.problem
    cli = verify_cli(log)
    assert cli.returncode == 0 and "crash repair: 57 bytes" in cli.stdout, cli.stdout + cli.stderr
    repair = [json.loads(line) for line in log.read_text().splitlines()][5]
    assert repair["mark"]["kind"] == "repair" and repair["mark"]["bytes"] == 57
    import hashlib

    assert repair["mark"]["sha256"] == hashlib.sha256(torn).hexdigest()


def test_the_multi_process_log_repairs_a_torn_tail_too(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    shared = SharedAuditLog(log, level="all")
    event = Event.message("a@acme.example", "x@partner.example")
    for _ in range(3):
        shared.submit(event, POLICY.decide(event))
    shared.close()
    with log.open("ab") as f:
        f.write(b'{"hash":"0123')  # a worker killed in the middle of its write
    restarted = SharedAuditLog(log, level="all")
    restarted.submit(event, POLICY.decide(event))
    restarted.close()
    result = verify([str(log)])
    assert result.intact and result.records == 5 and result.chains[0].repairs, result.problem


def _per_process_writer(folder: str, count: int) -> None:
    _write(Path(folder) / "audit.{pid}.jsonl", count, background=False).close()


def test_verify_of_a_folder_checks_each_per_process_chain_on_its_own(tmp_path: Path) -> None:
    """Issue 16.7: `audit verify DIR` on `{pid}` logs said 'records were removed or reordered'."""
    context = multiprocessing.get_context("fork")
    children = [context.Process(target=_per_process_writer, args=(str(tmp_path), 4 + i)) for i in range(3)]
    for child in children:
        child.start()
    for child in children:
        child.join(30)
        assert child.exitcode == 0
    assert len(list(tmp_path.glob("audit.*.jsonl"))) == 3
    result = verify([str(tmp_path)])
    assert result.intact and len(result.chains) == 3 and result.records == 4 + 5 + 6, result.problem
    cli = verify_cli(tmp_path)
    assert cli.returncode == 0 and "(3 chains)" in cli.stdout, cli.stdout + cli.stderr
    # one chain broken is named, the others still checked on their own
    victim = sorted(tmp_path.glob("audit.*.jsonl"))[1]
    lines = victim.read_text().splitlines()
    del lines[1]
    victim.write_text("\n".join(lines) + "\n")
    broken = verify([str(tmp_path)])
    assert not broken.intact and str(victim) in (broken.problem or "")


def test_a_sealed_log_without_any_seal_or_with_a_later_start_fails_with_the_key(tmp_path: Path) -> None:
    verification_key = keygen(tmp_path / "k")
    log = tmp_path / "plain.jsonl"
    _write(log, 3, background=False).close()
    result = verify_cli(log, verification_key)
    assert result.returncode == 1 and "no seal" in result.stderr


# -- against the real service -------------------------------------------------------------------------


class Service:
    """`policyplug serve` with a sealed audit log, asked over its Unix socket."""

    def __init__(self, workdir: Path, *extra: str):
        self.workdir = workdir
        self.sock = workdir / "pp.sock"
        self.log = workdir / "log" / "audit.jsonl"
        self.key = workdir / "keys" / "seal.key"
        policy = workdir / "sealed.policy"
        policy.write_text(POLICY_TEXT)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "policyplug",
                "serve",
                str(policy),
                "--socket",
                str(self.sock),
                "--audit-log",
                str(self.log),
                "--audit-level",
                "all",
                "--audit-max-bytes",
                "6000",
                "--audit-seal-key",
                str(self.key),
                "--audit-seal-interval",
                "0.25",
                *extra,
            ],  # an option in extra wins
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output = ""
        assert self.proc.stdout is not None
        while True:  # until it says it listens (a socket file left by a killed service is no sign)
            line = self.proc.stdout.readline()
            assert line, "the service did not start: " + self.output
            self.output += line
            if line.startswith("policyplug serve:"):
                break
        self.client = socket.socket(socket.AF_UNIX)
        self.client.settimeout(20)
        self.client.connect(str(self.sock))

    def decide(self, count: int, sender: str = "eve@evil.example") -> None:
        requests = b"".join(
            json.dumps(
                {"id": i, "event": {"kind": "message", "from": sender, "to": f"u{i}@acme.example"}}
            ).encode()
            + b"\n"
            for i in range(count)
        )
        self.client.sendall(requests)
        received = b""
        while received.count(b"\n") < count:
            chunk = self.client.recv(1 << 16)
            assert chunk
            received += chunk

    def stop(self, sig: int = signal.SIGTERM) -> str:
        self.client.close()
        self.proc.send_signal(sig)
        return self.output + self.proc.communicate(timeout=30)[0]


def _run_bursts(service: Service, bursts: int) -> None:
    for _ in range(bursts):
        service.decide(12)
        time.sleep(0.35)  # more than an interval: each burst gets its seal


@pytest.mark.slow
def test_untouched_sealed_log_verifies_across_rotation_and_a_crash_repaired_tail(tmp_path: Path) -> None:
    verification_key = keygen(tmp_path / "keys")
    service = Service(tmp_path)
    _run_bursts(service, 4)
    service.stop(signal.SIGKILL)
    with service.log.open("ab") as f:
        f.write(b'{"hash":"5e0c4f","decision":{"deci')  # torn by the crash
    service = Service(tmp_path)
    _run_bursts(service, 3)
    service.stop()
    assert len(list(service.log.parent.glob("audit.jsonl.*"))) >= 2, "rotated"
    result = verify_cli(service.log, verification_key)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "crash repair" in result.stdout and "sealed up to" in result.stdout
    assert "no record follows the last seal" in result.stdout, "the service seals when it stops"
    keyed = verify([str(service.log)], key=parse_verification_key(verification_key))
    chain = keyed.chains[0]
    assert chain.seals >= 7 and chain.first_seal_index == 0 and chain.repairs
    assert SealKey.load(service.key).index == chain.last_seal["index"] + 1, (
        "the key advanced past its last seal"
    )


@pytest.mark.slow
def test_attacks_on_a_log_written_by_serve_are_found_with_the_key(tmp_path: Path) -> None:
    verification_key = keygen(tmp_path / "keys")
    service = Service(tmp_path)
    _run_bursts(service, 5)
    service.stop()
    assert verify_cli(service.log, verification_key).returncode == 0
    found = assert_attacks_found(service.log, verification_key, service.key, tmp_path / "attacks")
    print("\n".join(found))
    assert len(found) == 6


def test_records_after_the_last_seal_are_reported_unsealed(tmp_path: Path) -> None:
    verification_key = keygen(tmp_path / "keys")
    service = Service(tmp_path)
    _run_bursts(service, 2)
    service.stop(signal.SIGKILL)  # no closing seal
    lines = service.log.read_text().splitlines()
    last_seal = max(i for i, line in enumerate(lines) if '"kind":"seal"' in line)
    # records written after the last seal, by a writer that died before sealing them
    writer = AuditWriter(service.log, level="all", background=False)
    event = Event.message("late@evil.example", "u@acme.example")
    writer.submit(event, POLICY.decide(event))
    writer.close()
    result = verify_cli(service.log, verification_key)
    assert result.returncode == 0, result.stderr
    unsealed = len(lines) - last_seal - 1 + 1
    assert f"{unsealed} records follow the last seal, not sealed yet" in result.stdout, result.stdout


@pytest.mark.slow
def test_a_rolled_back_key_file_is_found(tmp_path: Path) -> None:
    verification_key = keygen(tmp_path / "keys")
    service = Service(tmp_path)
    _run_bursts(service, 2)
    backup = tmp_path / "seal.key.backup"
    shutil.copy2(service.key, backup)  # an older copy of the key file (a backup the attacker found)
    backed_up_at = SealKey.load(backup).index
    _run_bursts(service, 3)
    service.stop()
    assert SealKey.load(service.key).index > backed_up_at + 1
    assert verify_cli(service.log, verification_key).returncode == 0
    shutil.copy2(backup, service.key)  # rolled back
    service = Service(tmp_path)
    _run_bursts(service, 2)
    output = service.stop()
    assert "rolled back" in output, "the writer says so in its log"
    result = verify_cli(service.log, verification_key)
    assert result.returncode == 1 and "rolled back" in result.stderr, result.stdout + result.stderr
    seals = [r for _, records in read(service.log) for r in records if is_seal(r)]
    assert [s["mark"]["index"] for s in seals].count(backed_up_at) == 2


def test_serve_refuses_a_sealed_log_per_process(tmp_path: Path) -> None:
    keygen(tmp_path / "keys")
    policy = tmp_path / "p.policy"
    policy.write_text(POLICY_TEXT)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "policyplug",
            "serve",
            str(policy),
            "--socket",
            str(tmp_path / "s.sock"),
            "--audit-log",
            str(tmp_path / "audit.{pid}.jsonl"),
            "--audit-seal-key",
            str(tmp_path / "keys" / "seal.key"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "{pid}" in result.stderr


@pytest.mark.parametrize("text", ["nonsense", "ppseal1-zz", "ppseal1-" + "ab" * 8])
def test_a_bad_verification_key_is_a_clear_error(tmp_path: Path, text: str) -> None:
    log = tmp_path / "audit.jsonl"
    _write(log, 1, background=False).close()
    result = verify_cli(log, text)
    assert result.returncode == 1 and "error:" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_tail_cut_with_its_last_seals_is_found_against_the_heads_a_real_rsyslog_holds(
    tmp_path: Path,
) -> None:
    """Cutting the end of the log together with its last seals leaves a log that verifies with the
    key: only the chain heads held off the host show it (docs/audit.md)."""
    from policyplug.audit.syslog import read_heads
    from tests.audit_attacks import copy_log, files_of
    from tests.servers.rsyslog import RsyslogServer

    verification_key = keygen(tmp_path / "keys")
    with RsyslogServer(tmp_path / "rsyslog") as collector:
        service = Service(tmp_path, "--audit-syslog", f"127.0.0.1:{collector.port}")
        _run_bursts(service, 4)
        service.stop()
        seals = [r for _, records in read(service.log) for r in records if is_seal(r)]
        deadline = time.monotonic() + 10
        while len(read_heads(collector.output)) < len(seals) and time.monotonic() < deadline:
            time.sleep(0.1)
    heads = read_heads(collector.output)
    assert len(heads) == len(seals) >= 4, "every seal's head reached the collector"
    assert "policyplug" in collector.output.read_text() and " audit-head " in collector.output.read_text()
    intact = verify_cli(service.log, verification_key, "--heads", str(collector.output))
    assert intact.returncode == 0, intact.stdout + intact.stderr
    assert f"{len(heads)} chain heads held off the host match the log" in intact.stdout

    # the attacker cuts the log after an earlier seal: the last seals go with the records they sealed
    cut = copy_log(service.log, tmp_path / "cut")
    lines = [(path, line) for path in files_of(cut) for line in path.read_bytes().splitlines(keepends=True)]
    keep = [n for n, (_, line) in enumerate(lines) if b'"kind":"seal"' in line][-3] + 1
    for path in files_of(cut):
        kept = b"".join(line for p, line in lines[:keep] if p == path)
        if kept:
            path.write_bytes(kept)
        else:
            path.unlink()  # a newer file cut whole (verify finds the rotated files without it)
    alone = verify_cli(cut, verification_key)
    assert alone.returncode == 0 and "no record follows the last seal" in alone.stdout, (
        "in the file alone a tail cut at a seal cannot be seen"
    )
    against = verify_cli(cut, verification_key, "--heads", str(collector.output))
    assert against.returncode == 1 and "cut off together with its last seals" in against.stderr, (
        against.stdout + against.stderr
    )


@pytest.mark.slow
def test_heads_of_every_batch_find_a_cut_of_unsealed_records(tmp_path: Path) -> None:
    """With --audit-syslog-batches the collector holds the head after each batch: cutting records that
    no seal covers yet (the writer killed before sealing them) is found too."""
    from policyplug.audit.syslog import read_heads
    from tests.audit_attacks import copy_log, files_of
    from tests.servers.rsyslog import RsyslogServer

    keygen(tmp_path / "keys")
    with RsyslogServer(tmp_path / "rsyslog") as collector:
        service = Service(
            tmp_path,
            "--audit-syslog",
            f"127.0.0.1:{collector.port}",
            "--audit-syslog-batches",
            "--audit-seal-interval",
            "30",
            "--audit-max-bytes",
            "1000000",
        )
        service.decide(5)
        time.sleep(0.3)
        service.decide(5)
        time.sleep(0.3)
        service.stop(signal.SIGKILL)  # no seal at all yet: every record is after the last seal
        records = [r for _, rs in read(service.log) for r in rs]
        deadline = time.monotonic() + 10
        while (
            not any(h["seq"] == records[-1]["seq"] for h in read_heads(collector.output))
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
    heads = read_heads(collector.output)
    assert heads and max(h["seq"] for h in heads) == len(records) == 10
    assert verify_cli(service.log, None, "--heads", str(collector.output)).returncode == 0
    cut = copy_log(service.log, tmp_path / "cut")
    (path,) = files_of(cut)
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:7]))
    assert verify_cli(cut).returncode == 0, "the chain alone does not show a cut tail"
    against = verify_cli(cut, None, "--heads", str(collector.output))
    assert against.returncode == 1 and "ends at seq 7" in against.stderr, against.stderr


def test_a_crash_between_a_seal_and_the_key_advancing_is_not_a_gap(tmp_path: Path) -> None:
    """The seal was written and synced, the key file not replaced yet: the next writer finds that
    seal at the end of the log and advances the key first, so no interval is sealed twice."""
    verification_key = keygen(tmp_path / "k")
    key_file, log = tmp_path / "k" / "seal.key", tmp_path / "audit.jsonl"
    _write(log, 3, background=False, seal_key=key_file).close()  # closing seals: interval 0
    before_close = SealKey.load(key_file)
    before_close.index, before_close.key = 0, parse_verification_key(verification_key)
    before_close.save()  # as if the writer died right after writing seal 0
    _write(log, 2, background=False, seal_key=key_file).close()
    seals = [r["mark"]["index"] for _, records in read(log) for r in records if is_seal(r)]
    assert seals == [0, 1]
    result = verify_cli(log, verification_key)
    assert result.returncode == 0 and "intervals 0–1 without gap" in result.stdout, (
        result.stdout + result.stderr
    )


def test_a_report_from_a_sealed_log_with_a_repair_counts_the_decisions_and_skips_nothing(
    tmp_path: Path,
) -> None:
    """Seal and repair records are the log's own: `report --audit-log` counts decisions only, quietly."""
    keygen(tmp_path / "k")
    log, policy = tmp_path / "audit.jsonl", tmp_path / "sealed.policy"
    policy.write_text(POLICY_TEXT)
    _write(log, 3, background=False, seal_key=tmp_path / "k" / "seal.key").close()
    with log.open("ab") as f:
        f.write(b'{"hash":"ab')
    _write(log, 2, background=False, seal_key=tmp_path / "k" / "seal.key").close()
    marks = [r for _, records in read(log) for r in records if "mark" in r]
    assert [m["mark"]["kind"] for m in marks] == ["seal", "repair", "seal"]
    result = subprocess.run(
        [sys.executable, "-m", "policyplug", "report", "--audit-log", str(log), "--policy", str(policy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "skipped" not in result.stdout + result.stderr and "from 5 audit records" in result.stdout, (
        result.stdout
    )
    assert "outbound   deny           5" in result.stdout


SHARED_BEFORE_FORK: SharedAuditLog


def _direct_worker(count: int) -> None:
    event = Event.message("w@acme.example", "x@partner.example")
    for _ in range(count):
        assert SHARED_BEFORE_FORK.submit(event, POLICY.decide(event))


def test_forked_workers_writing_the_multi_process_log_directly_are_sealed_by_one_process(
    tmp_path: Path,
) -> None:
    """Kamailio with `audit_spool = false`: each worker chains and writes under the lock, the timer
    process (here the parent) seals what any of them wrote."""
    global SHARED_BEFORE_FORK
    from policyplug.audit.seal import Sealer

    verification_key = keygen(tmp_path / "k")
    log = tmp_path / "audit.jsonl"
    SHARED_BEFORE_FORK = SharedAuditLog(log, level="all", sealer=Sealer(tmp_path / "k" / "seal.key", 0.01))
    context = multiprocessing.get_context("fork")
    for _round in range(3):
        children = [context.Process(target=_direct_worker, args=(5,)) for _ in range(2)]
        for child in children:
            child.start()
        for child in children:
            child.join(30)
            assert child.exitcode == 0
        assert SHARED_BEFORE_FORK.seal_if_due(force=True)
        assert not SHARED_BEFORE_FORK.seal_if_due(force=True), "nothing new to seal"
    result = verify_cli(log, verification_key)
    assert result.returncode == 0 and "3 seals, intervals 0–2" in result.stdout, result.stdout + result.stderr
    assert "no record follows the last seal" in result.stdout
