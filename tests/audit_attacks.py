"""An attacker's tools against an audit log: rewrite it and recompute every hash, as someone with
write access to the files (and maybe the current sealing key file) would. Used by the sealed-log
tests against logs written by `policyplug serve` and by Kamailio."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from policyplug.audit.record import GENESIS, canonical
from policyplug.audit.seal import SealKey, seal_mac
from policyplug.audit.verify import expand, verify


def files_of(log: Path) -> list[Path]:
    return expand([str(log)])


def read(log: Path) -> list[tuple[Path, list[dict[str, Any]]]]:
    return [(path, [json.loads(line) for line in path.read_text().splitlines()]) for path in files_of(log)]


def write(files: list[tuple[Path, list[dict[str, Any]]]], *, renumber: bool = True) -> None:
    """Write the records back with the chain recomputed: every `prev`, `seq` and `hash`."""
    prev, seq = GENESIS, 0
    for path, records in files:
        lines = []
        for record in records:
            seq = seq + 1 if renumber else record["seq"]
            body = {k: v for k, v in record.items() if k != "hash"}
            body["prev"], body["seq"] = prev, seq
            digest = hashlib.sha256(canonical(body)).hexdigest()
            lines.append(b'{"hash":"' + digest.encode() + b'",' + canonical(body)[1:])
            prev = digest
        path.write_bytes(b"".join(line + b"\n" for line in lines))


def copy_log(log: Path, into: Path) -> Path:
    into.mkdir(parents=True)
    for path in files_of(log):
        shutil.copy2(path, into / path.name)
    return into / log.name


def is_seal(record: dict[str, Any]) -> bool:
    return record.get("mark", {}).get("kind") == "seal"


def sealed_decisions(files: list[tuple[Path, list[dict[str, Any]]]]) -> list[tuple[int, int]]:
    """(file index, record index) of every decision record that a later seal covers."""
    flat = [(f, r, rec) for f, (_, records) in enumerate(files) for r, rec in enumerate(records)]
    last_seal = max(i for i, (_, _, rec) in enumerate(flat) if is_seal(rec))
    return [(f, r) for f, r, rec in flat[:last_seal] if "decision" in rec]


def reseal_with(
    files: list[tuple[Path, list[dict[str, Any]]]], key: SealKey, *, key_id: str | None = None
) -> None:
    """After a rewrite: drop the seals from the first sealed decision on and seal the end again with `key`
    (the attacker's own new key, or the current key file they stole), then recompute the chain."""
    write(files)
    files[:] = read(files[-1][0])
    last = [r for _, records in files for r in records][-1]
    records = files[-1][1]
    when = last["time"]
    mark = {
        "index": key.index,
        "key": key_id or key.id,
        "kind": "seal",
        "mac": seal_mac(key.key, key.index, last["seq"] + 1, last["hash"], when),
    }
    records.append({"id": "f" * 32, "mark": mark, "node": last["node"], "time": when, "v": 1})
    write(files)


def drop_seals(files: list[tuple[Path, list[dict[str, Any]]]]) -> None:
    for _, records in files:
        records[:] = [r for r in records if not is_seal(r)]


def verify_cli(log: Path, key: str | None = None, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "policyplug", "audit", "verify", str(log), *extra]
    if key is not None:
        command += ["--key", key]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def assert_attacks_found(log: Path, verification_key: str, key_file: Path, work: Path) -> list[str]:
    """Every attack of issue 18 on a copy of `log`; each must be found by `verify --key`. The
    messages, for the caller to look at."""
    found = []

    def attacked(name: str) -> tuple[Path, list[tuple[Path, list[dict[str, Any]]]]]:
        copy = copy_log(log, work / name)
        return copy, read(copy)

    def expect_failure(copy: Path, *needles: str) -> None:
        result = verify_cli(copy, verification_key)
        assert result.returncode == 1, f"{copy.parent.name}: not found\n{result.stdout}{result.stderr}"
        assert "TAMPERED" in result.stderr and any(n in result.stderr for n in needles), result.stderr
        unkeyed = verify([str(copy)])  # the chain itself was recomputed: without the key it looks intact
        found.append(
            f"{copy.parent.name}: {result.stderr.splitlines()[0]} (without --key: "
            f"{'intact' if unkeyed.intact else unkeyed.problem})"
        )

    # 1. a sealed decision rewritten (deny -> allow, another sender), every hash recomputed
    copy, files = attacked("rewritten")
    f, r = sealed_decisions(files)[0]
    record = files[f][1][r]
    record["decision"]["decision"] = "allow" if record["decision"]["decision"] != "allow" else "deny"
    record["event"]["from"] = "someone-else@acme.example"
    write(files)
    assert verify([str(copy)]).intact, "the rewrite recomputed the chain"
    expect_failure(copy, "does not match the chain")

    # 1b. the same, and the seals after it made again with the current key file the attacker took
    copy, files = attacked("rewritten-resealed")
    f, r = sealed_decisions(files)[0]
    files[f][1][r]["decision"]["reason"] = "rewritten"
    drop_seals(files)
    reseal_with(files, SealKey.load(key_file))
    expect_failure(copy, "missing", "first seal")

    # 2. a sealed record removed, the chain (and seq) recomputed
    copy, files = attacked("removed")
    f, r = sealed_decisions(files)[1]
    del files[f][1][r]
    write(files)
    expect_failure(copy, "does not match the chain")

    # 3. two sealed records swapped, the chain recomputed
    copy, files = attacked("reordered")
    (f1, r1), (f2, r2) = sealed_decisions(files)[:2]
    files[f1][1][r1], files[f2][1][r2] = files[f2][1][r2], files[f1][1][r1]
    write(files)
    expect_failure(copy, "does not match the chain")

    # 4. a seal forged with a newly generated key (after rewriting what it covers)
    copy, files = attacked("forged")
    f, r = sealed_decisions(files)[0]
    files[f][1][r]["decision"]["decision"] = "allow"
    drop_seals(files)
    forged = SealKey(work / "forged.key", bytes(range(32)), 0, "0123456789abcdef")
    reseal_with(files, forged)
    expect_failure(copy, "not made with this verification key")
    # ... and claiming our key's id
    copy, files = attacked("forged-id")
    f, r = sealed_decisions(files)[0]
    files[f][1][r]["decision"]["decision"] = "allow"
    drop_seals(files)
    reseal_with(
        files, SealKey(work / "forged2.key", bytes(range(32)), 0, "x"), key_id=SealKey.load(key_file).id
    )
    expect_failure(copy, "does not match the chain", "missing")
    return found
