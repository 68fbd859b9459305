"""Red team of `policyplug audit verify` (docs/audit.md): whoever can put a file where the verifier
looks, or write a line into a log, must not make verify hang, eat memory or crash; and the seal checks
that walk the key schedule must not be made to walk for hours."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from policyplug.audit.record import GENESIS, record_hash
from policyplug.audit.seal import key_id, keygen, parse_verification_key
from policyplug.audit.verify import verify


def _cli(
    *args: str, memory: int | None = None, timeout: float = 60
) -> tuple[subprocess.CompletedProcess[str], float]:
    def limit() -> None:
        if memory is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "policyplug", "audit", "verify", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit,
    )
    return result, time.monotonic() - start


def _chain(records: list[dict[str, Any]], prev: str = GENESIS, seq: int = 1) -> bytes:
    """Records given their content, chained and hashed as a writer would."""
    lines = []
    for record in records:
        record = {
            "id": uuid.uuid4().hex,
            "node": "n",
            "time": "2026-12-07T00:00:00+00:00",
            "v": 1,
            **record,
            "prev": prev,
            "seq": seq,
        }
        record["hash"] = prev = record_hash(record)
        seq += 1
        import orjson

        lines.append(orjson.dumps(record) + b"\n")
    return b"".join(lines)


def test_verify_refuses_a_fifo_and_a_device_at_once(tmp_path: Path) -> None:
    """A FIFO named as the log (or the heads, or the key) would block verify until someone writes;
    /dev/zero would be read for ever into one line."""
    fifo = tmp_path / "audit.jsonl"
    os.mkfifo(fifo)
    good = tmp_path / "good" / "audit.jsonl"
    good.parent.mkdir()
    good.write_bytes(_chain([{"mark": {"kind": "note"}}]))
    for args in (
        [str(fifo)],
        ["/dev/zero"],
        ["--heads", str(fifo), str(good)],
        ["--heads", "/dev/zero", str(good)],
        ["--key", str(fifo), str(good)],
        ["--key", "/dev/zero", str(good)],
    ):
        result, took = _cli(*args, memory=1 << 30)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
        assert took < 30, (args, took)
    result, _ = _cli(str(fifo))
    assert "not a regular file" in result.stderr


def test_a_huge_line_is_refused_with_bounded_memory(tmp_path: Path) -> None:
    """A log whose tail is a 1 GiB line without newline (a sparse file: no disk used) is refused
    by a verify limited to 512 MiB of address space over its normal need."""
    log = tmp_path / "audit.jsonl"
    log.write_bytes(_chain([{"mark": {"kind": "note"}}] * 3))
    with log.open("r+b") as file:
        file.truncate(log.stat().st_size + (1 << 30))
    # a line of zeros is not a record; within the limit it would be a truncated tail, beyond it an error
    result, took = _cli(str(log), memory=1 << 30)
    assert result.returncode == 1 and "longer than" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_line_over_the_limit_is_named_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[verify.__module__], "MAX_RECORD_LINE", 4096)
    log = tmp_path / "audit.jsonl"
    log.write_bytes(_chain([{"mark": {"kind": "note"}}] * 2) + b"x" * 10000 + b"\n")
    result = verify([str(log)])
    assert not result.intact and f"{log}:3: a line longer than 4096" in (result.problem or "")


@pytest.mark.parametrize("partial", [False, True])
def test_a_seal_far_along_the_key_schedule_fails_at_once(tmp_path: Path, partial: bool) -> None:
    """A seal claiming interval 2^31 (written by whoever could append a line) made verify --key walk the
    key schedule 2^31 steps (~11 µs each here: hours) before it looked at anything else."""
    verification_key = keygen(tmp_path / "k")
    k0 = parse_verification_key(verification_key)
    log = tmp_path / "audit.jsonl"
    seal = {"mark": {"index": 2**31, "key": key_id(k0), "kind": "seal", "mac": "00" * 32}}
    if partial:
        log.write_bytes(_chain([{"mark": {"kind": "note"}}, seal], prev="ab" * 32, seq=2**31 + 10))
    else:
        log.write_bytes(_chain([{"mark": {"kind": "note"}}, seal]))
    args = ["--partial"] if partial else []
    result, took = _cli(*args, "--key", verification_key, str(log), timeout=120)
    assert result.returncode == 1, result.stdout
    assert took < 30, took
    assert ("key steps along" if partial else "impossible interval") in result.stderr, result.stderr


def test_a_seal_with_a_junk_index_or_mac_fails_cleanly(tmp_path: Path) -> None:
    verification_key = keygen(tmp_path / "k")
    k0 = parse_verification_key(verification_key)
    for index, mac in ((True, "x"), ("0", None), (-1, "00"), (1.5, "00"), ([0], "00"), (None, "00")):
        log = tmp_path / f"audit-{uuid.uuid4().hex}.jsonl"
        mark: dict[str, Any] = {"index": index, "key": key_id(k0), "kind": "seal"}
        if mac is not None:
            mark["mac"] = mac
        log.write_bytes(_chain([{"mark": {"kind": "note"}}, {"mark": mark}]))
        result, _ = _cli("--key", verification_key, str(log))
        assert result.returncode == 1 and "Traceback" not in result.stderr, (index, mac, result.stderr)


# -- attacks by someone who holds the current key file and the logs (docs/audit.md) ---------------------


def _sealed_log(
    tmp_path: Path, name: str, verification_key: str | None = None, shared_key_file: Path | None = None
) -> tuple[Path, str, Path]:
    """A log of three sealed writer sessions (seals 0, 1, 2), the verification key and key file."""
    from tests.test_audit_seal import _write

    folder = tmp_path / f"k-{name}"
    if verification_key is None:
        verification_key = keygen(folder)
        key_file = folder / "seal.key"
    else:
        assert shared_key_file is not None
        key_file = shared_key_file
    log = tmp_path / name / "audit.jsonl"
    log.parent.mkdir()
    for _ in range(3):
        _write(log, 3, background=False, seal_key=key_file).close()
    return log, verification_key, key_file


def _verify(log: Path, key: str) -> subprocess.CompletedProcess[str]:
    from tests.audit_attacks import verify_cli

    return verify_cli(log, key)


def test_splicing_records_between_two_logs_of_one_key_is_found(tmp_path: Path) -> None:
    """Two logs sealed with one key (against the advice): records of the second put into the first
    with the chain recomputed, and the seals kept. The spliced-in seal repeats or skips an interval."""
    from tests.audit_attacks import read, write

    first, key, key_file = _sealed_log(tmp_path, "a")
    second, _, _ = _sealed_log(
        tmp_path, "b", key, key_file
    )  # the key went on: the second log's seals are 3, 4, 5
    assert _verify(first, key).returncode == 0
    assert "not 0" in _verify(second, key).stderr  # the second log alone is found: one key per log
    files = read(first)
    files[0][1][4:4] = read(second)[0][1][:4]  # a whole sealed session of the other log, seal included
    write(files)
    result = _verify(first, key)
    assert result.returncode == 1 and "TAMPERED" in result.stderr, result.stdout


def test_replaying_an_old_seal_at_the_end_is_found(tmp_path: Path) -> None:
    """Records removed from the end and an earlier seal record copied there (its MAC is genuine)."""
    from tests.audit_attacks import is_seal, read, write

    log, key, _ = _sealed_log(tmp_path, "a")
    files = read(log)
    records = files[0][1]
    first_seal = next(r for r in records if is_seal(r))
    records[:] = [*records[:-5], dict(first_seal)]
    write(files)
    result = _verify(log, key)
    assert result.returncode == 1 and "interval 0, after interval" in result.stderr, result.stderr


def test_a_forged_repair_record_cannot_hide_a_removed_record(tmp_path: Path) -> None:
    """A sealed decision replaced by a `repair` mark (as if a crash had torn it) with the chain
    recomputed: the seal after it no longer matches."""
    from tests.audit_attacks import read, write

    log, key, _ = _sealed_log(tmp_path, "a")
    files = read(log)
    records = files[0][1]
    victim = next(i for i, r in enumerate(records) if "decision" in r)
    records[victim] = {
        "id": records[victim]["id"],
        "mark": {"bytes": 57, "kind": "repair", "offset": 0, "sha256": "0" * 64},
        "node": records[victim]["node"],
        "time": records[victim]["time"],
        "v": 1,
    }
    write(files)
    result = _verify(log, key)
    assert result.returncode == 1 and "does not match the chain before it" in result.stderr, result.stderr


def test_altering_a_seal_or_repair_mark_is_found(tmp_path: Path) -> None:
    from tests.audit_attacks import is_seal, read, write

    log, key, _ = _sealed_log(tmp_path, "a")
    for change in ("seal-time", "seal-key"):
        files = read(log)
        records = files[0][1]
        seal = next(r for r in records if is_seal(r))
        if change == "seal-time":  # a time warp: the seal said to be an hour earlier
            seal["time"] = "2000-01-01T00:00:00+00:00"
        else:
            seal["mark"]["key"] = "0" * 16
        write(files)
        result = _verify(log, key)
        assert result.returncode == 1, (change, result.stdout)
        log, key, _ = _sealed_log(tmp_path, f"again-{change}")
