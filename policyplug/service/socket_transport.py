"""The local socket transport: newline-delimited JSON over a Unix stream socket, pipelined.

request : {"id": 7, "event": {...event JSON...}}
answer  : {"id": 7, "decision": {...decision JSON...}}
error   : {"id": 7, "error": "field 'to': missing"}
ops     : {"id": 8, "op": "status"} / {"id": 9, "op": "reload"}

A client may send many requests without waiting; answers carry the request's id. The requests
read in one chunk are answered with one write per ANSWER_GROUP of them. A malformed or oversized
line gets an error answer and the connection lives on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from pathlib import Path
from typing import Any

import orjson

from ..events import EventError
from .server import DecisionService

log = logging.getLogger("policyplug.service.socket")

MAX_LINE = 1 << 20  # 1 MiB
# Answers written per group: one write per read is cheapest, but after a stall (a stopped virtual CPU,
# a slow client) a read brings a backlog of tens of requests, and answering them all in one write made
# the first wait for the last (60 requests x 30 µs = 1.8 ms added to each). In groups of 8, the backlog
# is answered as it is decided, for one more write per 8 requests.
ANSWER_GROUP = 8


def _answer(request_id: Any, **payload: Any) -> bytes:
    return orjson.dumps({"id": request_id, **payload}) + b"\n"


def handle_line(service: DecisionService, line: bytes, connection: Any = None) -> bytes:
    """One request line -> one answer line. Never raises. `connection` (a _Connection) is what a
    `watch` op subscribes to reload notices."""
    try:
        request = orjson.loads(line)
    except (orjson.JSONDecodeError, ValueError, UnicodeDecodeError) as exc:
        service.invalid_requests += 1
        return _answer(None, error=f"not JSON: {exc}")
    if not isinstance(request, dict):
        service.invalid_requests += 1
        return _answer(None, error="a request must be a JSON object")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str | int | float):
        # an array or object as id could be nested deeper than the answer's serialiser goes (orjson
        # reads 1,024 levels, writes 254): refused here, so every line still gets its one answer
        service.invalid_requests += 1
        return _answer(None, error="'id' must be a JSON scalar (string, number, boolean or null)")
    try:
        if "event" in request:
            # the decision arrives serialised (shared with its audit record): splice it in
            return b"".join(
                (
                    b'{"id":',
                    orjson.dumps(request_id),
                    b',"decision":',
                    service.decide_encoded(request["event"]),
                    b"}\n",
                )
            )
        op = request.get("op")
        if op == "status":
            return _answer(request_id, status=service.status())
        if op == "reload":
            if connection is not None:  # answered when the load is done, decisions go on meanwhile
                connection.reload(request_id)
                return b""
            return _answer(request_id, reload=service.reload("socket request"))
        if op == "watch" and connection is not None:
            connection.watch()
            return _answer(
                request_id, watch={"revision": service.policy.revision, "cacheable": service.cacheable}
            )
        service.invalid_requests += 1
        return _answer(request_id, error="a request needs 'event' (or 'op': 'status' | 'reload')")
    except EventError as exc:
        service.invalid_requests += 1
        return _answer(request_id, error=str(exc))
    except Exception as exc:  # a bug must not kill the connection; fail safe, say so
        log.exception("request %r", request_id)
        return _answer(request_id, error=f"internal error: {type(exc).__name__}: {exc}")


class SocketPathError(Exception):
    """The socket path is taken by something that is not a socket."""


class SocketTransport:
    def __init__(self, service: DecisionService, path: str | Path, mode: int = 0o660):
        self.service = service
        self.path = Path(path)
        self.mode = mode
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        try:
            mode = self.path.lstat().st_mode
        except FileNotFoundError:
            pass
        else:
            # only a stale socket of a previous run is removed: `--socket precious.txt` must not
            # delete the operator's file (nor a symlink's target, nor a folder)
            if not stat.S_ISSOCK(mode):
                raise SocketPathError(
                    f"{self.path} exists and is not a socket; not removing it "
                    "(choose another --socket path, or remove it yourself)"
                )
            self.path.unlink()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        self.server = await loop.create_unix_server(lambda: _Connection(self.service), path=str(self.path))
        os.chmod(self.path, self.mode)
        log.info("listening on %s", self.path)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class _Connection(asyncio.Protocol):
    """One client. A protocol, not streams: no coroutine hop per chunk read, which is most of
    the transport's cost at small batches."""

    def __init__(self, service: DecisionService):
        self.service = service
        self.transport: asyncio.Transport | None = None
        # An incomplete line, grown in place: bytes + bytes per chunk copied the whole line again at
        # every read (a 1 MB line sent in 128-byte writes cost 1.2 s of CPU).
        self.pending = bytearray()
        self.discarding = False  # inside an oversized line: drop bytes up to its newline
        self.reloads: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def watch(self) -> None:
        """From now on, tell this client of every reload (the `watch` op)."""
        if self.reloaded not in self.service.reload_listeners:
            self.service.reload_listeners.append(self.reloaded)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.reloaded in self.service.reload_listeners:
            self.service.reload_listeners.remove(self.reloaded)

    def reload(self, request_id: Any) -> None:
        """The `reload` op: load off the event loop (DecisionService.reload_async), answer when done."""
        task = asyncio.get_running_loop().create_task(self._reload(request_id))
        self.reloads.add(task)  # a reference, or the task may be collected before it ends
        task.add_done_callback(self.reloads.discard)

    async def _reload(self, request_id: Any) -> None:
        answer = await self.service.reload_async("socket request")
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_answer(request_id, reload=answer))

    def reloaded(self, notice: dict[str, Any]) -> None:
        """Tell a watching client a new policy is in force: {"id": null, "reloaded": {"revision",
        "cacheable"}}. Answers decided before it were written before it, on this one ordered stream."""
        if self.transport is not None:
            self.transport.write(_answer(None, reloaded=notice))

    def data_received(self, data: bytes) -> None:
        if self.discarding:
            newline = data.find(b"\n")
            if newline < 0:
                return
            data = data[newline + 1 :]
            self.discarding = False
        if self.pending:
            if b"\n" not in data:  # only the new bytes are searched: linear in the line's length
                self.pending += data
                if len(self.pending) > MAX_LINE:
                    self.service.invalid_requests += 1
                    self.pending = bytearray()
                    self.discarding = True
                    if self.transport is not None:
                        self.transport.write(
                            _answer(None, error=f"request line longer than {MAX_LINE} bytes")
                        )
                return
            self.pending += data
            data = bytes(self.pending)
            self.pending = bytearray()
        lines = data.split(b"\n")
        rest = lines.pop()
        service = self.service
        out = []
        for line in lines:
            if len(line) > MAX_LINE:
                service.invalid_requests += 1
                out.append(_answer(None, error=f"request line longer than {MAX_LINE} bytes"))
            elif line.strip():
                answer = handle_line(service, line, self)
                if answer:
                    out.append(answer)
                if len(out) == ANSWER_GROUP and self.transport is not None:
                    self.transport.write(b"".join(out))
                    out = []
        if len(rest) > MAX_LINE:
            # an oversized line still without its end: answer now, drop the rest of it as it comes
            service.invalid_requests += 1
            out.append(_answer(None, error=f"request line longer than {MAX_LINE} bytes"))
            self.discarding = True
        elif rest:
            self.pending += rest
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    # back-pressure: a client that does not read its answers stops being read
    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()
