"""Forward-secure sealing of the audit log (docs/audit.md, "Sealed audit log").

Key schedule (HMAC-SHA256 from `cryptography`):

    k_0            32 random bytes, made by `policyplug audit keygen`; the verification key is k_0
                   (printed once, kept off the host)
    k_{i+1}      = HMAC(k_i, "policyplug-seal advance")
    mac key of i = HMAC(k_i, "policyplug-seal mac")
    seal i MAC   = HMAC(mac key of i, "policyplug-seal-1|i|seq|prev|time") of the seal record's own
                   index, sequence number, chain head before it (`prev`) and time

The key file on the writer's host holds only (k_i, i). A seal record (a `mark` of kind `seal`) is
written into the chain with k_i, the log is fsynced, then k_{i+1} replaces k_i in the key file
(written to a new file, fsynced, renamed over the old one, the folder fsynced): k_i is gone from
disk and cannot be recomputed from k_{i+1}. Each index seals once, so a legitimate log carries
seals 0, 1, 2, ... without gap or repeat, across restarts; a verifier that knows k_0 recomputes
every k_i and checks each seal, its index sequence, and that its MAC covers the chain up to it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.hmac import HMAC

from .record import mark_parts

log = logging.getLogger("policyplug.audit")

KEY_FILE = "seal.key"
VERIFICATION_PREFIX = "ppseal1-"
KEY_FORMAT = 1
DEFAULT_INTERVAL = 60.0  # seconds between seals while records come in (serve --audit-seal-interval)
_ADVANCE = b"policyplug-seal advance"
_MAC = b"policyplug-seal mac"


def _hmac(key: bytes, data: bytes) -> bytes:
    mac = HMAC(key, hashes.SHA256())
    mac.update(data)
    return mac.finalize()


def advance(key: bytes) -> bytes:
    """k_{i+1} from k_i: one way, so a key file taken later does not give the earlier keys."""
    return _hmac(key, _ADVANCE)


def key_id(k0: bytes) -> str:
    """Names the key a log is sealed with (in every seal and the key file): not secret."""
    return hashlib.sha256(b"policyplug-seal id|" + k0).hexdigest()[:16]


def seal_mac(key: bytes, index: int, seq: int, prev: str, time: str) -> str:
    return _hmac(
        _hmac(key, _MAC), b"policyplug-seal-1|%d|%d|%s|%s" % (index, seq, prev.encode(), time.encode())
    ).hex()


def parse_verification_key(text: str) -> bytes:
    text = text.strip()
    if not text.startswith(VERIFICATION_PREFIX):
        raise ValueError(f"not a policyplug verification key (it starts {VERIFICATION_PREFIX}...)")
    try:
        k0 = bytes.fromhex(text[len(VERIFICATION_PREFIX) :])
    except ValueError:
        raise ValueError("the verification key is not hex after its prefix") from None
    if len(k0) != 32:
        raise ValueError("the verification key must hold 32 bytes")
    return k0


def keygen(directory: str | Path) -> str:
    """Make DIR/seal.key (k_0, index 0) and return the verification key (one line)."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / KEY_FILE
    if path.exists():
        raise FileExistsError(
            f"{path} exists: a new key would make the logs sealed with it unverifiable "
            "with their verification key; move it away first"
        )
    k0 = os.urandom(32)
    SealKey(path, k0, 0, key_id(k0)).save()
    return VERIFICATION_PREFIX + k0.hex()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class SealKey:
    """The writer's key file: the current key k_i, its index i and the key's id."""

    path: Path
    key: bytes
    index: int
    id: str

    @classmethod
    def load(cls, path: str | Path) -> SealKey:
        path = Path(path)
        try:
            data = orjson.loads(path.read_bytes())
            if data.get("format") != KEY_FORMAT:
                raise ValueError(f"key format {data.get('format')!r}, not {KEY_FORMAT}")
            key, index, ident = bytes.fromhex(data["key"]), int(data["index"]), str(data["id"])
            if len(key) != 32 or index < 0:
                raise ValueError("key or index out of range")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}: not a usable seal key ({exc})") from None
        return cls(path, key, index, ident)

    def save(self) -> None:
        """Replace the key file atomically and durably: a crash leaves the old key or the new one,
        and once this returns the old one is not in the folder any more."""
        body = (
            orjson.dumps({"format": KEY_FORMAT, "id": self.id, "index": self.index, "key": self.key.hex()})
            + b"\n"
        )
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.path)
        _fsync_dir(self.path.parent)

    def advance(self) -> None:
        self.key, self.index = advance(self.key), self.index + 1
        self.save()


def last_seal(paths: list[Path], limit: int = 1 << 30) -> dict[str, Any] | None:
    """The `mark` of the last seal in the log (its newest file first), reading back at most `limit`
    bytes: where a restarted writer learns whether its key advanced after its last seal."""
    needle = b'"kind":"seal"'
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            position, carry, read = os.fstat(fd).st_size, b"", 0
            while position > 0 and read < limit:
                step = min(position, 1 << 20)
                position -= step
                read += step
                buffer = os.pread(fd, step, position) + carry
                # whole lines only: before the first newline a line may begin in the chunk before
                first = 0 if position == 0 else buffer.find(b"\n") + 1
                if first == 0 and position > 0:
                    carry = buffer
                    continue
                at = buffer.rfind(needle, first)
                while at >= 0:
                    start = buffer.rfind(b"\n", 0, at) + 1
                    stop = buffer.find(b"\n", at)
                    with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                        mark = orjson.loads(buffer[start : stop if stop >= 0 else len(buffer)])["mark"]
                        if mark["kind"] == "seal":
                            return dict(mark)
                    at = buffer.rfind(needle, first, start)
                carry = buffer[:first]
        finally:
            os.close(fd)
    return None


class Sealer:
    """The writer's side: when to seal, the seal record, advancing the key after it is on disk.

    `heads` (optional) is told every seal (syslog.HeadSender: the chain head off the host)."""

    def __init__(
        self,
        key_path: str | Path,
        interval: float = DEFAULT_INTERVAL,
        heads: Any = None,
        head_batches: bool = False,
    ):
        if interval <= 0:
            raise ValueError("the seal interval must be positive")
        self.key_path = Path(key_path)
        checked = SealKey.load(key_path)  # a bad key file is an error at start; the key is read again where
        self.key_id, index = checked.id, checked.index  # it is used (Kamailio's workers never hold it)
        del checked
        self._key: SealKey | None = None
        self.interval = float(interval)
        self.heads = heads
        self.head_batches = head_batches and heads is not None  # also a head after every batch of records
        self._head_sent = -1
        self.unsealed = 0  # records appended since the last seal
        self.last: float | None = None  # monotonic time of the last seal (None: none yet by this writer)
        self.checked = False
        self.sealed_seq: int | None = None  # seq of the last seal this sealer wrote
        self.stats: dict[str, Any] = {"seals": 0, "seal_index": index, "last_seal": None}

    @property
    def key(self) -> SealKey:
        """The key file, read by the process that seals when it first needs it. A temporary file a
        crash left behind while the key was being replaced holds a key that will be old soon: gone."""
        if self._key is None:
            for stale in self.key_path.parent.glob(f".{self.key_path.name}.*.tmp"):
                with contextlib.suppress(OSError):
                    stale.unlink()
            self._key = SealKey.load(self.key_path)
        return self._key

    @classmethod
    def from_options(
        cls,
        key_path: str | Path,
        interval: float | None = None,
        syslog: str | None = None,
        hostname: str | None = None,
        syslog_batches: bool = False,
    ) -> Sealer:
        """A sealer as `serve --audit-seal-key --audit-seal-interval --audit-syslog` (or the Kamailio
        adapter's `audit_seal_key`, `audit_seal_interval`, `audit_syslog`) asks for."""
        heads = None
        if syslog:
            from .syslog import HeadSender

            heads = HeadSender(syslog, hostname=hostname)
        return cls(key_path, interval or DEFAULT_INTERVAL, heads=heads, head_batches=syslog_batches)

    def check_log(self, files: list[Path]) -> None:
        """Once, before the first seal: compare the key file with the last seal in the log."""
        self.checked = True
        mark = last_seal(files)
        if mark is None or mark.get("key") != self.key.id:
            return
        index = int(mark.get("index", -1))
        if index == self.key.index:
            # the seal was written and synced, the key file was not replaced yet (a crash in between)
            log.warning(
                "audit seal %d is in the log but the key was not advanced (a crash after it): advancing now",
                index,
            )
            self.key.advance()
        elif index > self.key.index:
            log.error(
                "audit seal key %s is at index %d but the log holds seal %d: the key file was rolled back to "
                "an older copy; sealing on with it (audit verify --key reports it)",
                self.key.path,
                self.key.index,
                index,
            )

    def due(self, now: float) -> bool:
        if not self.unsealed:
            return False
        if self.last is None:
            self.last = now  # the first interval starts with the first record
            return False
        return now - self.last >= self.interval

    def seal_parts(self, *, prev: str, seq: int, time: str, node: str) -> tuple[bytes, bytes]:
        """(head, tail) of seal record number `seq` following the record whose hash is `prev`."""
        mark = {
            "index": self.key.index,
            "key": self.key.id,
            "kind": "seal",
            "mac": seal_mac(self.key.key, self.key.index, seq, prev, time),
        }
        return mark_parts(mark, node=node, time=time)

    def sealed(self, now: float, *, seq: int, hash_: str, time: str, log_path: Path, node: str) -> None:
        """After the seal record is written and the log fsynced: forget the key, tell the heads."""
        index = self.key.index
        self.key.advance()
        self.unsealed = 0
        self.last = now
        self.sealed_seq = seq
        self.stats["seals"] += 1
        self.stats["seal_index"] = self.key.index
        self.stats["last_seal"] = time
        if self.heads is not None:
            self.heads.send(
                {
                    "log": str(log_path.resolve()),
                    "node": node,
                    "seq": seq,
                    "hash": hash_,
                    "index": index,
                    "kind": "seal",
                    "time": time,
                }
            )
            self._head_sent = seq

    def batch_written(self, *, seq: int, hash_: str, log_path: Path, node: str) -> None:
        """With `head_batches`: the chain head after a batch of records, off the host at once (a cut
        of the tail is then seen to the batch, not only to the last seal)."""
        if self.head_batches and seq != self._head_sent:
            from .record import now_iso

            self.heads.send(
                {
                    "log": str(log_path.resolve()),
                    "node": node,
                    "seq": seq,
                    "hash": hash_,
                    "kind": "batch",
                    "time": now_iso(),
                }
            )
            self._head_sent = seq
