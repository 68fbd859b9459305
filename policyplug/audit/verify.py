"""`policyplug audit verify`: check the hash chains of audit log files, and their seals.

Files are read in the order given (oldest first: audit.jsonl.3, .2, .1, audit.jsonl); a folder
or a base name expands to its rotated files in that order. Each chain (a base name and its
rotations; a folder of per-process logs holds one chain per process) is checked on its own. The
first record that was altered, removed, inserted or reordered is named by file, line and record id.
A last line cut short by a crash (no newline, not JSON) is reported as a truncated tail, not as
tampering: it is what SIGKILL between write and fsync leaves behind; a writer that starts on such a
tail cuts it and writes a `repair` record, reported as a crash repair.

With the verification key (seal.py) every seal is checked: made with this key, its interval index
the next one, its MAC over the chain head before it. With the chain heads a collector received
(syslog.py) the log is compared with them, which finds a tail cut together with its last seals.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .files import MAX_RECORD_LINE, bounded_lines, open_regular
from .record import GENESIS, record_hash
from .seal import advance, key_id, seal_mac


@dataclass
class ChainResult:
    """One chain: a log file and its rotations."""

    name: str
    files: list[str] = field(default_factory=list)
    records: int = 0  # every record of the chain, seals and repairs included
    problem: str | None = None
    truncated_tail: str | None = None
    repairs: list[str] = field(default_factory=list)
    seals: int = 0
    first_seal_index: int | None = None
    last_seal: dict[str, Any] | None = None  # where, seq, index, time of the last good seal
    unsealed: int = 0  # records after the last seal
    unsealed_span: tuple[str, str] | None = None  # their times, first and last
    heads_checked: int = 0

    @property
    def intact(self) -> bool:
        return self.problem is None


@dataclass
class VerifyResult:
    """All chains given; `problem` and `truncated_tail` of the first chain that has one."""

    chains: list[ChainResult] = field(default_factory=list)
    problem: str | None = None
    keyed: bool = False

    @property
    def intact(self) -> bool:
        return self.problem is None

    @property
    def records(self) -> int:
        return sum(chain.records for chain in self.chains)

    @property
    def files(self) -> list[str]:
        return [name for chain in self.chains for name in chain.files]

    @property
    def truncated_tail(self) -> str | None:
        return next((chain.truncated_tail for chain in self.chains if chain.truncated_tail), None)


ROTATION = re.compile(r"\.(\d+)$")  # audit.jsonl.3: a rotated file, its number


def expand(paths: list[str]) -> list[Path]:
    """Each path as given; a directory or a base file name with rotations -> oldest first."""
    return [path for chain in expand_chains(paths) for path in chain]


def expand_chains(paths: list[str]) -> list[list[Path]]:
    """The files of `paths` grouped by chain (by base name, rotations removed), each oldest first
    as given or expanded; chains in the order first named."""
    chains: dict[Path, list[Path]] = {}
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            bases = sorted({p.name.split(".jsonl")[0] + ".jsonl" for p in path.glob("*.jsonl*")})
            found = [f for base in bases for f in _rotations(path / base)]
        else:
            found = _rotations(path) if not ROTATION.search(path.name) else [path]
        for file in found:
            match = ROTATION.search(file.name)
            base = file.with_name(file.name[: match.start()]) if match else file
            chain = chains.setdefault(base, [])
            if file not in chain:
                chain.append(file)
    return list(chains.values())


def _rotations(base: Path) -> list[Path]:
    rotated = []
    for p in base.parent.glob(base.name + ".*"):
        suffix = p.name[len(base.name) + 1 :]
        if suffix.isdigit():
            rotated.append((int(suffix), p))
    files = [p for _, p in sorted(rotated, reverse=True)]
    if base.exists():
        files.append(base)
    return files


def verify(
    paths: list[str],
    allow_partial: bool = False,
    key: bytes | None = None,
    heads: list[dict[str, Any]] | None = None,
) -> VerifyResult:
    """Check every chain of `paths`; with `key` (k_0, seal.parse_verification_key) their seals,
    with `heads` (syslog.read_heads) against the heads a collector holds."""
    result = VerifyResult(keyed=key is not None)
    chains = expand_chains(paths)
    if not chains:
        result.problem = "no audit log files found in " + " ".join(paths)
        return result
    for files in chains:
        name = str(files[-1].with_name(ROTATION.sub("", files[-1].name)))
        chain_heads = None
        if heads is not None:
            chain_heads = [h for h in heads if h["log"] == str(Path(name).resolve())]
            if not chain_heads and len(chains) == 1 and len({h["log"] for h in heads}) == 1:
                chain_heads = heads  # a copy of the log checked elsewhere: the one log the collector knows
        checked = _check_chain(name, files, allow_partial, key, chain_heads)
        result.chains.append(checked)
        if checked.problem and result.problem is None:
            result.problem = checked.problem
    return result


class _Keys:
    """k_i from k_0, walking forward from the last one computed (seal indexes mostly go up by one)."""

    def __init__(self, k0: bytes):
        self.k0 = k0
        self.index, self.key = 0, k0

    def get(self, index: int) -> bytes:
        if index < self.index:
            self.index, self.key = 0, self.k0
        while self.index < index:
            self.key = advance(self.key)
            self.index += 1
        return self.key


MAX_SEAL_INDEX = 1 << 32  # far beyond any real log (one seal a second for 136 years): refuse to walk further
# The first seal of a --partial chain may be far along the key schedule; walking there costs ~10 µs a
# step on a slow machine, so 4M steps (~8 years of 60 s intervals) is where it stops being an answer.
MAX_KEY_WALK = 1 << 22


def _check_chain(
    name: str, files: list[Path], allow_partial: bool, k0: bytes | None, heads: list[dict[str, Any]] | None
) -> ChainResult:
    result = ChainResult(name)
    previous = None  # hash of the previous record; None before the first
    previous_seq = None
    keys = _Keys(k0) if k0 is not None else None
    our_id = key_id(k0) if k0 is not None else None
    last_index: int | None = None
    since_seal: list[str] = []  # times of the records after the last good seal: first and last kept
    unsealed = 0
    wanted = {h["seq"]: h for h in heads} if heads else {}
    first_seq = None
    from_genesis = False  # the chain starts at its first record (not --partial from the middle)

    def fail(message: str) -> ChainResult:
        result.problem = message
        return result

    for file_index, path in enumerate(files):
        result.files.append(str(path))
        last_file = file_index == len(files) - 1
        try:
            fd = open_regular(path)
        except (OSError, ValueError) as exc:
            return fail(f"{path}: cannot be read as an audit log: {exc}")
        # line by line, each bounded: a log that was never rotated can be gigabytes
        for number, raw in enumerate(bounded_lines(fd, MAX_RECORD_LINE), start=1):
            where = f"{path}:{number}"
            if raw is None:
                return fail(f"{where}: a line longer than {MAX_RECORD_LINE} bytes is not an audit record")
            complete = raw.endswith(b"\n")  # only a file's last line can lack its newline
            try:
                record = orjson.loads(raw[:-1] if complete else raw)
                stored = record["hash"]
                prev = record["prev"]
                seq = int(record["seq"])
            except (ValueError, KeyError, TypeError):
                if not complete and last_file:
                    result.truncated_tail = (
                        f"{where}: last line is incomplete (a crash before it was written whole)"
                    )
                    break
                return fail(f"{where}: not a valid audit record (altered or corrupted)")
            rid = record.get("id", "?")
            if record_hash(record) != stored:
                return fail(f"{where}: record {rid} was altered (its hash does not match its content)")
            if previous is None and prev != GENESIS:
                if not allow_partial:
                    return fail(
                        f"{where}: record {rid} (seq {seq}) is not the start of the chain: earlier "
                        "records were removed, or give the older rotated files too (or --partial)"
                    )
                result.files[-1] += f" (chain taken from seq {seq})"
            elif previous is not None and prev != previous:
                missing = (
                    "removed or reordered"
                    if previous_seq is not None and seq != previous_seq + 1
                    else "reordered"
                )
                return fail(
                    f"{where}: record {rid} (seq {seq}) does not follow the record before it "
                    f"(seq {previous_seq}): records were {missing}"
                )
            if first_seq is None:
                first_seq = seq
                from_genesis = prev == GENESIS
            head = wanted.get(seq)
            if head is not None:
                result.heads_checked += 1
                if head["hash"] != stored:
                    return fail(
                        f"{where}: record {rid} (seq {seq}) is not the record the collector received "
                        f"at {head['time']} (hash {head['hash'][:16]}…): the log was rewritten"
                    )
            mark = record.get("mark")
            if type(mark) is dict and mark.get("kind") == "repair":
                result.repairs.append(
                    f"{where}: crash repair: {mark.get('bytes')} bytes of a torn last line "
                    f"cut at offset {mark.get('offset')} (sha256 {str(mark.get('sha256'))[:16]}…)"
                )
            elif type(mark) is dict and mark.get("kind") == "seal" and keys is not None:
                try:
                    index, mac = int(mark["index"]), str(mark["mac"])
                except (KeyError, TypeError, ValueError):
                    return fail(f"{where}: seal {rid} (seq {seq}) is malformed")
                covered = (
                    f"records seq {result.last_seal['seq'] + 1}–{seq - 1}"
                    if result.last_seal
                    else f"records up to seq {seq - 1}"
                )
                if mark.get("key") != our_id:
                    return fail(
                        f"{where}: seal {rid} (seq {seq}) was not made with this verification key "
                        f"(key id {mark.get('key')!s:.16}, expected {our_id}): a forged seal, or a log "
                        "sealed with another key"
                    )
                if last_index is not None and index <= last_index:
                    return fail(
                        f"{where}: seal {rid} (seq {seq}) has interval {index}, after interval "
                        f"{last_index}: the sealing key was rolled back to an older copy (or seals "
                        "were copied)"
                    )
                if last_index is not None and index != last_index + 1:
                    return fail(
                        f"{where}: seal {rid} (seq {seq}) has interval {index} after interval "
                        f"{last_index}: the seals of intervals {last_index + 1}–{index - 1} are "
                        f"missing, so {covered} were rewritten or removed and sealed again with a "
                        "later key"
                    )
                # before the MAC: it walks the key schedule up to `index`, ~10 µs a step here,
                # so an index out of reach would take hours. Seal i follows seals 0..i-1: i < seq.
                if not 0 <= index < min(MAX_SEAL_INDEX, seq):
                    return fail(f"{where}: seal {rid} (seq {seq}) has an impossible interval {index}")
                if index - keys.index > MAX_KEY_WALK:  # only the first seal of a --partial chain jumps
                    return fail(
                        f"{where}: seal {rid} (seq {seq}) has interval {index}, more than {MAX_KEY_WALK} key "
                        "steps along: refused (verify the chain from its first file instead of --partial)"
                    )
                if result.first_seal_index is None and index != 0 and from_genesis:
                    return fail(
                        f"{where}: the first seal {rid} (seq {seq}) has interval {index}, not 0: the "
                        f"seals of intervals 0–{index - 1} are missing, so {covered} were rewritten "
                        "or removed and sealed again with a later key (or the key sealed another log "
                        "before: make one key per log)"
                    )
                if seal_mac(keys.get(index), index, seq, prev, str(record.get("time"))) != mac:
                    return fail(
                        f"{where}: seal {rid} (seq {seq}, interval {index}) does not match the chain "
                        f"before it: {covered} were altered, removed or reordered (hashes recomputed), "
                        "or the seal was forged"
                    )
                if result.first_seal_index is None:
                    result.first_seal_index = index
                last_index = index
                result.seals += 1
                result.last_seal = {
                    "where": where,
                    "seq": seq,
                    "index": index,
                    "time": record.get("time"),
                }
                since_seal, unsealed = [], 0
            elif type(mark) is dict and mark.get("kind") == "seal":
                result.seals += 1
            else:
                unsealed += 1
                when = str(record.get("time"))
                if not since_seal:
                    since_seal = [when, when]
                else:
                    since_seal[1] = when
            previous, previous_seq = stored, seq
            result.records += 1
    if keys is not None:
        result.unsealed = unsealed
        result.unsealed_span = (since_seal[0], since_seal[1]) if since_seal else None
        if result.last_seal is None and result.records:
            return fail(f"{name}: no seal made with this verification key: nothing in the log is sealed")
    if heads:
        newest = max(heads, key=lambda h: h["seq"])
        if previous_seq is None or newest["seq"] > previous_seq:
            return fail(
                f"{name}: the log ends at seq {previous_seq or 0}, but the collector holds a chain head "
                f"at seq {newest['seq']} (sealed at {newest['time']}): the end of the log was cut off "
                "together with its last seals"
            )
        if first_seq is not None and not any(h["seq"] >= first_seq for h in heads):
            return fail(
                f"{name}: none of the collector's heads is in the log: not the log the collector knows"
            )
    return result
