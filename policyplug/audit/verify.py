"""`policyplug audit verify`: check the hash chain of audit log files.

Files are read in the order given (oldest first: audit.jsonl.3, .2, .1, audit.jsonl); a folder
or a base name expands to its rotated files in that order. The first record that was altered,
removed, inserted or reordered is named by file, line and record id. A last line cut short
by a crash (no newline, not JSON) is reported as a truncated tail, not as tampering: it is what
SIGKILL between write and fsync leaves behind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from .log import GENESIS, record_hash


@dataclass
class VerifyResult:
    records: int = 0
    files: list[str] = field(default_factory=list)
    problem: str | None = None
    truncated_tail: str | None = None

    @property
    def intact(self) -> bool:
        return self.problem is None


ROTATION = re.compile(r"\.(\d+)$")  # audit.jsonl.3: a rotated file, its number


def expand(paths: list[str]) -> list[Path]:
    """Each path as given; a directory or a base file name with rotations -> oldest first."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            bases = sorted({p.name.split(".jsonl")[0] + ".jsonl" for p in path.glob("*.jsonl*")})
            for base in bases:
                out.extend(_rotations(path / base))
        else:
            out.extend(_rotations(path) if not ROTATION.search(path.name) else [path])
    return out


def _rotations(base: Path) -> list[Path]:
    rotated = []
    for p in base.parent.glob(base.name + ".*"):
        suffix = p.name[len(base.name) + 1:]
        if suffix.isdigit():
            rotated.append((int(suffix), p))
    files = [p for _, p in sorted(rotated, reverse=True)]
    if base.exists():
        files.append(base)
    return files


def verify(paths: list[str], allow_partial: bool = False) -> VerifyResult:
    result = VerifyResult()
    previous = None  # hash of the previous record; None before the first
    previous_seq = None
    files = expand(paths)
    if not files:
        result.problem = "no audit log files found in " + " ".join(paths)
        return result
    for file_index, path in enumerate(files):
        result.files.append(str(path))
        last_file = file_index == len(files) - 1
        with path.open("rb") as log:  # line by line: a log that was never rotated can be gigabytes
            for number, raw in enumerate(log, start=1):
                where = f"{path}:{number}"
                complete = raw.endswith(b"\n")  # only a file's last line can lack its newline
                try:
                    record = orjson.loads(raw[:-1] if complete else raw)
                    stored = record["hash"]
                    prev = record["prev"]
                    seq = int(record["seq"])
                except (ValueError, KeyError, TypeError):
                    if not complete and last_file:
                        result.truncated_tail = f"{where}: last line is incomplete (a crash before it was written whole)"
                        return result
                    result.problem = f"{where}: not a valid audit record (altered or corrupted)"
                    return result
                rid = record.get("id", "?")
                if record_hash(record) != stored:
                    result.problem = f"{where}: record {rid} was altered (its hash does not match its content)"
                    return result
                if previous is None and prev != GENESIS:
                    if not allow_partial:
                        result.problem = (f"{where}: record {rid} (seq {seq}) is not the start of the chain: earlier "
                                          "records were removed, or give the older rotated files too (or --partial)")
                        return result
                    result.files[-1] += f" (chain taken from seq {seq})"
                elif previous is not None and prev != previous:
                    missing = "removed or reordered" if previous_seq is not None and seq != previous_seq + 1 \
                        else "reordered"
                    result.problem = (f"{where}: record {rid} (seq {seq}) does not follow the record before it "
                                      f"(seq {previous_seq}): records were {missing}")
                    return result
                previous, previous_seq = stored, seq
                result.records += 1
    return result
