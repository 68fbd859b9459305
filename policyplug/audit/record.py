"""The audit record's bytes and its chain: one encoder and one chaining function for every writer.

A record (docs/audit.md) is canonical JSON: keys sorted, no spaces, UTF-8. Writers put it together
from serialised parts instead of dumping a dict (the decision service and every Kamailio worker do
this on each audited decision), so this module keeps the parts and their order in one place:

- `RecordEncoder.body` / `.parts`: a decision record without its chain fields;
- `mark_parts`: a record the log writes about itself (a seal, a crash repair: `mark` records);
- `chain`: gives records their `prev` and `seq`, hashes them and makes their lines.

In sorted key order the chain fields `prev` and `seq` come right before the top-level `time`
(only `v` follows it), so an unchained record is handled as two parts, (head, tail), split where
its top-level `,"time":` starts; `chain` puts the chain fields between them. Tests hold every
part byte for byte equal to `canonical(build_record(...))`.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson

GENESIS = "0" * 64
FORMAT_VERSION = 1
_SORTED = orjson.OPT_SORT_KEYS
VERSION_PART = b',"v":' + str(FORMAT_VERSION).encode() + b"}"
TIME_KEY = b',"time":'  # where an unchained record's tail starts (its last occurrence: see the docstring)

# A record the log writes about itself has `mark` (an object with `kind`) instead of `event` and
# `decision`: "seal" (seal.py) or "repair" (a torn tail cut at start, log.repair_tail).
MARK_KINDS = ("seal", "repair")


def canonical(record: dict[str, Any]) -> bytes:
    """The bytes that are hashed: sorted keys, no spaces, UTF-8 (orjson: 7x faster than json here)."""
    return orjson.dumps(record, option=_SORTED)


def record_hash(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def build_record(
    event: Any,
    decision: Any,
    *,
    node: str,
    include_bodies: bool,
    record_id: str | None = None,
    time: str | None = None,
) -> dict[str, Any]:
    """An audit record (docs/audit.md) without its chain fields (`seq`, `prev`, `hash`).

    `record_id` defaults to a random 128-bit hex id, `time` to now (ISO 8601, UTC).
    """
    event_json = event_record(event, include_bodies)
    decision_json = decision.to_json()
    return {
        "v": FORMAT_VERSION,
        "id": record_id or uuid.uuid4().hex,
        "time": time or now_iso(),
        "node": node,
        "policy": decision_json.pop("policy"),
        "policy_revision": decision_json.pop("policy_revision"),
        "event": event_json,
        "decision": decision_json,
    }


def event_record(event: Any, include_bodies: bool) -> dict[str, Any]:
    """The event as recorded: its JSON, without body and subject unless bodies are kept."""
    event_json = event.to_json()
    if not include_bodies:
        event_json.pop("body", None)
        event_json.pop("subject", None)
    return event_json


def encode_event(event: Any, include_bodies: bool) -> bytes:
    """Canonical JSON of `event_record(event, include_bodies)`, built from the event's attributes
    (3x cheaper than Event.to_json + dumps: no intermediate copies, orjson formats the time).
    tests/test_audit.py holds it equal to `event_record` for every kind of event."""
    members = {
        "kind": event.kind,
        "from": event.sender.raw,
        "to": event.recipient.raw,
        "time": event.time,
        "protocol": event.protocol,
        "client": event.client,
        "headers": event.headers,
        "payload": event.payload,
        "type": event.type,
        "size": event.size,
    }
    if include_bodies:
        members["body"] = event.body
        members["subject"] = event.subject
    if event.content_complete is not True:  # as Event.to_json: only when false
        members["content_complete"] = False
    return orjson.dumps(members, option=_SORTED | orjson.OPT_UTC_Z)


# A policy makes few distinct decisions (one per rule and obligation set): their serialisations,
# by Decision.shape(), so the service does not serialise the same answer 20,000 times a second.
ENCODED_DECISIONS_LIMIT = 4096
_ENCODED_DECISIONS: dict[tuple[Any, ...], tuple[bytes, str, str]] = {}
# Only the decisions of the last few policy revisions are kept (a shape ends with its revision): a
# service reloading under traffic otherwise kept every old revision's answers (~2 KB each) until the
# limit above, ~8 MB of memory that looked like a leak for the first few hundred reloads.
ENCODED_REVISIONS_LIMIT = 4
_ENCODED_REVISIONS: dict[str, None] = {}  # the revisions remembered, oldest first


def encode_decision(decision: Any) -> tuple[bytes, str, str]:
    """(canonical JSON of the decision without its policy fields, policy name, policy revision).

    The bytes are the record's `decision` member; a transport may answer with them too (see
    `policyplug.service.socket_transport`), so a decision is serialised once.
    """
    shape = decision.shape()
    if shape is not None:
        encoded = _ENCODED_DECISIONS.get(shape)
        if encoded is not None:
            return encoded
    decision_json = decision.to_json()
    policy = decision_json.pop("policy")
    revision = decision_json.pop("policy_revision")
    encoded = orjson.dumps(decision_json, option=_SORTED), policy, revision
    if shape is not None:
        if len(_ENCODED_DECISIONS) >= ENCODED_DECISIONS_LIMIT:
            _ENCODED_DECISIONS.clear()
            _ENCODED_REVISIONS.clear()
        if revision not in _ENCODED_REVISIONS:  # a new revision (a reload): forget the oldest one's
            _ENCODED_REVISIONS[revision] = None
            if len(_ENCODED_REVISIONS) > ENCODED_REVISIONS_LIMIT:
                oldest = next(iter(_ENCODED_REVISIONS))
                del _ENCODED_REVISIONS[oldest]
                for key in [key for key in _ENCODED_DECISIONS if key[-1] == oldest]:
                    del _ENCODED_DECISIONS[key]
        _ENCODED_DECISIONS[shape] = encoded
    return encoded


def policy_part(policy: str, revision: str) -> bytes:
    """The record's `policy` and `policy_revision` members, serialised (between `node` and `prev`)."""
    return b',"policy":' + orjson.dumps(policy) + b',"policy_revision":' + orjson.dumps(revision)


def node_part(node: str) -> bytes:
    return b',"node":' + orjson.dumps(node)


def decision_head(decision: bytes, event: bytes, record_id: bytes, node: bytes, policy: bytes) -> bytes:
    """The head of an unchained decision record (up to its top-level time), from serialised parts:
    `decision`, `event` canonical JSON; `record_id` the hex id; `node` and `policy` from `node_part`
    and `policy_part`."""
    return b"".join(
        (b'{"decision":', decision, b',"event":', event, b',"id":"', record_id, b'"', node, policy)
    )


def tail_part(time: bytes) -> bytes:
    """The tail of an unchained record: its top-level time (as JSON) and the format version."""
    return TIME_KEY + time + VERSION_PART


def record_body(
    *,
    decision: bytes,
    event: bytes,
    record_id: str,
    node: str,
    policy: str,
    revision: str,
    prev: str,
    seq: int,
    time: str,
) -> bytes:
    """The canonical JSON of a record without `hash`, from serialised parts, as `chain` hashes it."""
    head = decision_head(decision, event, record_id.encode(), node_part(node), policy_part(policy, revision))
    (line,), _prev, _seq = chain([(head, tail_part(orjson.dumps(time)))], prev.encode(), seq - 1)
    return b"{" + line[len(b'{"hash":"') + 64 + len(b'",') : -1]  # the line without its hash member


def chain(parts: Iterable[tuple[bytes, bytes]], prev: bytes, seq: int) -> tuple[list[bytes], bytes, int]:
    """Chain unchained records, each given as (head, tail) (see the module docstring), after the
    record whose hash is `prev` (hex, as bytes) and number is `seq`: their lines (with `hash` first and
    a newline), and the new chain head (hash, seq). The one chaining function of every writer."""
    lines: list[bytes] = []
    add, join, sha256 = lines.append, b"".join, hashlib.sha256
    for head, tail in parts:
        seq += 1
        chained = join((head, b',"prev":"', prev, b'","seq":', b"%d" % seq, tail))
        prev = sha256(chained).hexdigest().encode()
        add(join((b'{"hash":"', prev, b'",', chained[1:], b"\n")))
    return lines, prev, seq


def cut_parts(body: bytes) -> tuple[bytes, bytes]:
    """(head, tail) of an unchained record given whole (a spooled line): split at its top-level time,
    the last `,"time":` in it (a `"` inside a JSON string is escaped, so no string can hold it)."""
    cut = body.rfind(TIME_KEY)
    if cut <= 0:
        raise ValueError(f"not an audit record: {body[:80]!r}")
    return body[:cut], body[cut:]


def mark_parts(
    mark: dict[str, Any], *, node: str, time: str, record_id: str | None = None
) -> tuple[bytes, bytes]:
    """(head, tail) of a mark record: what the log says about itself (`mark["kind"]` in MARK_KINDS)."""
    head = canonical({"id": record_id or os.urandom(16).hex(), "mark": mark, "node": node})[:-1]
    return head, tail_part(orjson.dumps(time))


# -- a writer's encoder -----------------------------------------------------------------------------

DECISION_CACHE_SIZE = 1024
ID_POOL = 256  # record ids drawn per os.urandom call


class RecordEncoder:
    """Audit records (docs/audit.md) without `seq`, `prev` and `hash`, as canonical JSON bytes.

    Per writer: the node member is made once, each decision's serialised parts are remembered by
    Decision.shape() (a policy makes few distinct decisions), record ids are cut from a pool of
    random bytes (`after_fork` empties it: a forked child must not hand out its parent's ids)."""

    def __init__(self, node: str, include_bodies: bool):
        self.node = node
        self.include_bodies = include_bodies
        self.node_part = node_part(node)
        # Decision.shape() -> (the decision's canonical JSON, its policy members)
        self._decisions: dict[tuple[Any, ...], tuple[bytes, bytes]] = {}
        self._ids = b""  # a pool of random hex ids, drawn from by draw_id
        self._next_id = 0

    def decision_parts(self, decision: Any) -> tuple[bytes, bytes]:
        """(the decision's canonical JSON, its policy members), remembered by Decision.shape()."""
        shape = decision.shape()  # None: not cached (an evaluation error, lists set by hand)
        parts = self._decisions.get(shape) if shape is not None else None
        if parts is None:
            encoded, policy, revision = encode_decision(decision)
            parts = (encoded, policy_part(policy, revision))
            if shape is not None:
                if len(self._decisions) >= DECISION_CACHE_SIZE:
                    self._decisions.clear()
                self._decisions[shape] = parts
        return parts

    def parts(
        self, event: Any, decision: Any, *, record_id: str | None = None, time: datetime | None = None
    ) -> tuple[bytes, bytes]:
        """(head, tail) of the record of `decision` on `event`; `time` defaults to now (UTC)."""
        encoded, policy = self.decision_parts(decision)
        rid = self.draw_id() if record_id is None else record_id.encode()
        return (
            decision_head(encoded, encode_event(event, self.include_bodies), rid, self.node_part, policy),
            tail_part(orjson.dumps(time or datetime.now(UTC))),
        )

    def line(
        self,
        event: Any,
        decision: Any,
        *,
        record_id: str | None = None,
        time: datetime | None = None,
        end: bytes = b"",
    ) -> bytes:
        """canonical(build_record(event, decision, ...)) + `end`; `time` defaults to now (UTC).

        The head of `decision_head` and the tail of `tail_part` in one join: this is on the path of
        every audited request of a Kamailio worker (tests hold it equal to `parts`)."""
        encoded, policy = self.decision_parts(decision)
        rid = self.draw_id() if record_id is None else record_id.encode()
        return b"".join((
            b'{"decision":', encoded, b',"event":', encode_event(event, self.include_bodies), b',"id":"', rid, b'"',
            self.node_part, policy, TIME_KEY, orjson.dumps(time or datetime.now(UTC)), VERSION_PART, end,
        ))  # fmt: skip

    def new_id(self) -> str:
        """A random 128-bit id in hex, as build_record makes."""
        return self.draw_id().decode()

    def draw_id(self) -> bytes:
        start = self._next_id
        if start >= len(self._ids):
            self._ids, start = os.urandom(16 * ID_POOL).hex().encode(), 0
        self._next_id = start + 32
        return self._ids[start : start + 32]

    def after_fork(self) -> None:
        """A forked child must not hand out the ids left in its parent's pool."""
        self._ids, self._next_id = b"", 0
