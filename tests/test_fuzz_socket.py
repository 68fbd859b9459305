"""Fuzz target (hypothesis) for the socket protocol of a real `policyplug serve`.

Whoever can connect to the socket (its group, docs/service.md) controls every byte sent: valid and
invalid JSON, wrong types, huge and deeply nested values, unknown ops, lines split across writes,
many requests pipelined, binary garbage, connections dropped mid-line. Whatever comes, every
non-blank request line gets exactly one answer, in order: a decision, or an error that names the
problem (never "internal error"); the service never dies; and a valid request asked afterwards on a
fresh connection still gets the right decision.

CI runs a fixed set of examples (the `ci` profile, tests/conftest.py). To fuzz longer, raise the number
of examples (docs/compiler.md, "Tests"):
`POLICYPLUG_FUZZ_EXAMPLES=20000 python3 -m pytest tests/test_fuzz_socket.py --hypothesis-seed=$RANDOM`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("POLICYPLUG_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
MAX_LINE = 1 << 20  # the transport's line limit (docs/service.md)

POLICY = """policy "fuzz"
local domains ["acme.example"]
default deny "outside"

rule internal:
  when direction == "internal"
  allow
"""

LOCALS = ["alice@acme.example", "bob@acme.example", "carol@acme.example/phone"]
REMOTES = ["dave@partner.example", "eve@evil.example"]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen, Path]]:
    tmp = tmp_path_factory.mktemp("fuzz-socket")
    policy = tmp / "fuzz.policy"
    policy.write_text(POLICY)
    sock = tmp / "pp.sock"
    log = open(tmp / "serve.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "policyplug",
            "serve",
            str(policy),
            "--socket",
            str(sock),
            "--audit-log",
            str(tmp / "audit.jsonl"),
            "--audit-level",
            "all",
            "--watch-interval",
            "3600",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert proc.poll() is None, (tmp / "serve.log").read_text()
        assert time.monotonic() < deadline, "service did not start"
        time.sleep(0.05)
    yield proc, sock
    alive = proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    log.close()
    assert alive, (tmp / "serve.log").read_text()[-4000:]
    assert "Traceback" not in (tmp / "serve.log").read_text(), (tmp / "serve.log").read_text()[-4000:]


@dataclass
class Line:
    """One request line and what its answer must look like."""

    data: bytes
    id: Any = None  # the id the answer carries
    decision: str | None = None  # "allow" / "deny" for a valid event
    error: str | None = None  # a fragment the error must contain ("" = any error)
    op: str | None = None  # "status" / "watch"


# -- generated lines ------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
ids = (
    st.none()
    | st.integers(-(2**63), 2**63 - 1)
    | st.text(max_size=20)
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False)
)


@st.composite
def valid_events(draw: st.DrawFn) -> Line:
    sender = draw(st.sampled_from(LOCALS + REMOTES))
    recipient = draw(st.sampled_from(LOCALS + REMOTES))
    event: dict[str, Any] = {
        "kind": draw(st.sampled_from(["message", "presence", "call"])),
        "from": sender,
        "to": recipient,
    }
    if draw(st.booleans()):
        event["body"] = draw(st.text(max_size=200))
    request_id = draw(ids)
    internal = sender in LOCALS and recipient in LOCALS
    return Line(
        json.dumps({"id": request_id, "event": event}).encode(),
        id=request_id,
        decision="allow" if internal else "deny",
    )


@st.composite
def invalid_events(draw: st.DrawFn) -> Line:
    """An object with an `event` that is wrong: a wrong type, a missing or mistyped field, junk fields."""
    request_id = draw(ids)
    base: dict[str, Any] = {"kind": "message", "from": "alice@acme.example", "to": "bob@acme.example"}
    how = draw(st.sampled_from(["not-object", "missing", "mistyped", "bad-address", "bad-kind"]))
    if how == "not-object":
        event: Any = draw(json_scalars | st.lists(json_values, max_size=3))
    elif how == "missing":
        event = dict(base)
        del event[draw(st.sampled_from(sorted(base)))]
    elif how == "mistyped":
        event = dict(base)
        event[draw(st.sampled_from(sorted(base)))] = draw(
            st.none()
            | st.integers()
            | st.lists(json_scalars, max_size=3)
            | st.dictionaries(st.text(max_size=5), json_scalars, max_size=3)
            | st.booleans()
        )
    elif how == "bad-address":
        event = dict(
            base,
            **{
                draw(st.sampled_from(["from", "to"])): draw(
                    st.sampled_from(
                        ["", "@", "a@", "@b", "a@b@c", "a\x00b@acme.example", "sip:", "x@" + "y" * 2000]
                    )
                )
            },
        )
    else:
        event = dict(
            base, kind=draw(st.text(max_size=10).filter(lambda k: k not in ("message", "presence", "call")))
        )
    return Line(json.dumps({"id": request_id, "event": event}).encode(), id=request_id, error="")


@st.composite
def events_with_junk(draw: st.DrawFn) -> Line:
    """A valid event with extra fields of any JSON shape: a decision or an error, never a crash."""
    event: dict[str, Any] = {
        "kind": "message",
        "from": draw(st.sampled_from(LOCALS)),
        "to": draw(st.sampled_from(LOCALS)),
    }
    event.update(
        draw(
            st.dictionaries(
                st.sampled_from(
                    [
                        "body",
                        "subject",
                        "headers",
                        "payload",
                        "client",
                        "time",
                        "size",
                        "type",
                        "id",
                        "attrs",
                        "x",
                        "",
                    ]
                ),
                json_values,
                max_size=3,
            )
        )
    )
    request_id = draw(ids)
    return Line(json.dumps({"id": request_id, "event": event}).encode(), id=request_id, decision="any")


@st.composite
def ops(draw: st.DrawFn) -> Line:
    request_id = draw(ids)
    op = draw(
        st.sampled_from(
            ["status", "watch", "STATUS", "", "decide", "reload ", None, 1, ["status"], {"op": 1}]
        )
    )
    request = {"id": request_id, "op": op}
    request.update(draw(st.dictionaries(st.sampled_from(["x", "ev", "Event"]), json_scalars, max_size=2)))
    known = op if op in ("status", "watch") else None
    return Line(
        json.dumps(request).encode(), id=request_id, op=known, error=None if known else "needs 'event'"
    )


@st.composite
def non_objects(draw: st.DrawFn) -> Line:
    value = draw(json_scalars | st.lists(json_values, max_size=4))
    return Line(json.dumps(value).encode(), error="JSON object")


@st.composite
def not_json(draw: st.DrawFn) -> Line:
    """Binary garbage or broken JSON (no newline inside: that would make two lines)."""
    data = draw(
        st.binary(min_size=1, max_size=300)
        | st.text(max_size=100).map(str.encode)
        | st.sampled_from(
            [
                b"{",
                b'{"id": 1, "event": ',
                b"{'id': 1}",
                b"NaN",
                b'{"id": 1}}',
                b"\xff\xfe",
                b'"\\ud800"',
                b'{"a": 1e99999}',
                b"\x00",
                b"[" * 3000 + b"]" * 3000,
                b'{"id":' + b"9" * 400 + b"}",
            ]
        )
    )
    data = data.replace(b"\n", b" ")
    if not data.strip():
        data = b"#" + data
    try:
        json.loads(data)
        is_json = True
    except (ValueError, RecursionError):  # Python's reader gives up on deep nesting before orjson's
        is_json = False
    # what parses as JSON (Python's reading) is judged by its shape; only its error must be an error
    return Line(data, error="" if is_json else "not JSON")


@st.composite
def nested(draw: st.DrawFn) -> Line:
    """Deep nesting inside a request: in the id, in the event, in an event field."""
    depth = draw(st.integers(1, 3000))
    where = draw(st.sampled_from(["id", "event", "body", "attrs"]))
    deep = "[" * depth + "]" * depth
    if where == "id":
        data = (
            '{"id": '
            + deep
            + ', "event": {"kind": "message", "from": "a@acme.example", "to": "b@acme.example"}}'
        )
    elif where == "event":
        data = '{"id": 1, "event": ' + deep + "}"
    elif where == "body":
        data = (
            '{"id": 1, "event": {"kind": "message", "from": "a@acme.example", "to": "b@acme.example", "body": '
            + deep
            + "}}"
        )
    else:
        data = (
            '{"id": 1, "event": {"kind": "message", "from": "a@acme.example", "to": "b@acme.example", '
            '"sender": {"attrs": {"x": ' + deep + "}}}}"
        )
    return Line(data.encode(), error=None, decision=None, id="?")  # judged loosely: any one answer


lines = st.one_of(
    valid_events(),
    valid_events(),
    invalid_events(),
    events_with_junk(),
    ops(),
    non_objects(),
    not_json(),
    nested(),
)


# -- the client -----------------------------------------------------------------------------------


def connect(sock: Path) -> socket.socket:
    client = socket.socket(socket.AF_UNIX)
    client.settimeout(15)
    client.connect(str(sock))
    return client


def read_answers(client: socket.socket, count: int) -> list[dict[str, Any]]:
    buffer = b""
    while buffer.count(b"\n") < count:
        chunk = client.recv(1 << 16)
        assert chunk, f"service closed the connection, {count} answers expected, got {buffer!r:.300}"
        buffer += chunk
    answers = buffer.split(b"\n")
    assert answers[count:] == [b""], f"more answers than request lines: {answers[count:]!r}"
    return [json.loads(a) for a in answers[:count]]


def check_answer(line: Line, answer: dict[str, Any]) -> None:
    assert isinstance(answer, dict) and "id" in answer, answer
    kinds = {"decision", "error", "status", "watch"} & set(answer)
    assert len(kinds) == 1, f"{line.data[:200]!r} -> {answer}"
    if "error" in answer:
        assert isinstance(answer["error"], str) and answer["error"], answer
        assert not answer["error"].startswith("internal error"), f"{line.data[:300]!r} -> {answer}"
    if line.id == "?":
        return
    if line.decision is not None or line.op is not None or line.error is not None:
        assert answer["id"] == line.id, f"{line.data[:200]!r} -> {answer}"
    if line.decision == "any":
        return
    if line.decision is not None:
        assert "decision" in answer, f"{line.data[:200]!r} -> {answer}"
        assert answer["decision"]["decision"] == line.decision, f"{line.data[:200]!r} -> {answer}"
    elif line.op is not None:
        assert line.op in answer, f"{line.data[:200]!r} -> {answer}"
    elif line.error is not None:
        assert "error" in answer, f"{line.data[:200]!r} -> {answer}"
        assert line.error in answer["error"], f"{line.data[:200]!r} -> {answer}"


def still_decides(proc: subprocess.Popen, sock: Path) -> None:
    """The service lives and a fresh connection gets correct decisions."""
    assert proc.poll() is None, "the service died"
    with connect(sock) as client:
        client.sendall(
            b'{"id": "in", "event": {"kind": "message", "from": "alice@acme.example", '
            b'"to": "bob@acme.example"}}\n{"id": "out", "event": {"kind": "message", '
            b'"from": "alice@acme.example", "to": "eve@evil.example"}}\n'
        )
        first, second = read_answers(client, 2)
    assert first["id"] == "in" and first["decision"]["decision"] == "allow", first
    assert second["id"] == "out" and second["decision"]["decision"] == "deny", second


def send_in_pieces(client: socket.socket, payload: bytes, cuts: list[int]) -> None:
    last = 0
    for cut in sorted({c % (len(payload) + 1) for c in cuts}):
        client.sendall(payload[last:cut])
        last = cut
    client.sendall(payload[last:])


# -- the targets ----------------------------------------------------------------------------------


@FUZZ
@given(
    batch=st.lists(lines, min_size=1, max_size=40),
    cuts=st.lists(st.integers(0, 1 << 20), max_size=12),
    blank=st.sampled_from([b"", b"\n", b"   \n", b"\r\n", b"\t \n"]),
)
def test_every_line_gets_one_answer_in_order(
    service, batch: list[Line], cuts: list[int], blank: bytes
) -> None:  # type: ignore[no-untyped-def]
    proc, sock = service
    # blank lines between requests are skipped, not answered (docs/service.md)
    payload = blank.join(line.data + b"\n" for line in batch)
    with connect(sock) as client:
        send_in_pieces(client, payload, cuts)
        answers = read_answers(client, len(batch))
    for line, answer in zip(batch, answers, strict=True):
        check_answer(line, answer)
    still_decides(proc, sock)


@FUZZ
@given(batch=st.lists(lines, min_size=1, max_size=20), cut=st.floats(0, 1), read_some=st.booleans())
def test_abrupt_disconnect_leaves_the_service_deciding(
    service,
    batch: list[Line],
    cut: float,  # type: ignore[no-untyped-def]
    read_some: bool,
) -> None:
    proc, sock = service
    payload = b"".join(line.data + b"\n" for line in batch)
    client = connect(sock)
    client.sendall(payload[: int(len(payload) * cut)])  # may stop mid-line
    if read_some:
        client.settimeout(0.05)
        try:
            client.recv(10)  # an answer may be under way, or not (nothing complete was sent)
        except TimeoutError:
            pass
    # a reset rather than an orderly close: unread answers are thrown away
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client.close()
    still_decides(proc, sock)


@pytest.mark.parametrize("depth", [254, 255, 600, 1023])
def test_deeply_nested_id_gets_one_answer(service, depth: int) -> None:  # type: ignore[no-untyped-def]
    """An id nested deeper than the JSON writer's limit (254) yet within the reader's (1024): the
    request and the ones pipelined with it are each answered, and the connection lives on."""
    proc, sock = service
    deep = "[" * depth + "]" * depth
    with connect(sock) as client:
        client.sendall(
            b'{"id": ' + deep.encode() + b', "event": {"kind": "message", "from": "alice@acme.example", '
            b'"to": "bob@acme.example"}}\n{"id": 2, "op": "status"}\n'
        )
        first, second = read_answers(client, 2)
    assert "decision" in first or "error" in first, first
    assert second["id"] == 2 and "status" in second
    still_decides(proc, sock)


@pytest.mark.parametrize("size", [MAX_LINE, MAX_LINE + 1, 3 * MAX_LINE])
@pytest.mark.parametrize("piece", [1 << 16, 1 << 20])
def test_oversized_lines_one_answer_then_normal(service, size: int, piece: int) -> None:  # type: ignore[no-untyped-def]
    """A line over the limit gets one error (sent in pieces of any size), the next line is decided."""
    proc, sock = service
    big = b'{"id": 1, "event": "' + b"x" * (size - 22) + b'"}'
    assert len(big) == size
    after = (
        b'{"id": 2, "event": {"kind": "message", "from": "alice@acme.example", "to": "bob@acme.example"}}\n'
    )
    with connect(sock) as client:
        send_in_pieces(client, big + b"\n" + after, list(range(piece, len(big), piece)))
        first, second = read_answers(client, 2)
    if size > MAX_LINE:
        assert first == {"id": None, "error": f"request line longer than {MAX_LINE} bytes"}
    else:
        assert (
            first["id"] == 1 and "error" in first
        )  # within the limit: judged as JSON (an event must be an object)
    assert second["id"] == 2 and second["decision"]["decision"] == "allow"
    still_decides(proc, sock)


def test_many_pipelined_requests_without_reading(service) -> None:  # type: ignore[no-untyped-def]
    """5,000 requests written before any answer is read: all answered, in order (back-pressure, no loss)."""
    proc, sock = service
    count = 5000
    payload = b"".join(
        json.dumps(
            {"id": i, "event": {"kind": "message", "from": LOCALS[i % 3], "to": (LOCALS + REMOTES)[i % 5]}}
        ).encode()
        + b"\n"
        for i in range(count)
    )
    with connect(sock) as client:
        import threading

        sender = threading.Thread(target=client.sendall, args=(payload,))
        sender.start()
        time.sleep(0.5)  # let the service block on writing to a client that does not read
        answers = read_answers(client, count)
        sender.join()
    for i, answer in enumerate(answers):
        assert answer["id"] == i
        assert answer["decision"]["decision"] == ("allow" if i % 5 < 3 else "deny")
    still_decides(proc, sock)


@example(b"\x00" * 100)
@example(b"\xff" * 100 + b"\n")
@FUZZ
@given(garbage=st.binary(min_size=1, max_size=2000))
def test_binary_garbage_then_a_valid_request(service, garbage: bytes) -> None:  # type: ignore[no-untyped-def]
    """Any bytes, then a newline and a valid request: the request still gets its decision, after one
    answer per non-blank garbage line."""
    proc, sock = service
    expected = sum(1 for part in garbage.split(b"\n") if part.strip())
    with connect(sock) as client:
        client.sendall(
            garbage + b'\n{"id": "v", "event": {"kind": "message", "from": "alice@acme.example", '
            b'"to": "bob@acme.example"}}\n'
        )
        answers = read_answers(client, expected + 1)
    for answer in answers[:-1]:
        assert "error" in answer and not answer["error"].startswith("internal error"), answer
    assert answers[-1]["id"] == "v" and answers[-1]["decision"]["decision"] == "allow"
    assert proc.poll() is None
