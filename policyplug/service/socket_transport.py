"""The local socket transport: newline-delimited JSON over a Unix stream socket, pipelined.

request : {"id": 7, "event": {...event JSON...}}
answer  : {"id": 7, "decision": {...decision JSON...}}
error   : {"id": 7, "error": "field 'to': missing"}
ops     : {"id": 8, "op": "status"} / {"id": 9, "op": "reload"}

A client may send many requests without waiting; answers carry the request's id. Everything
read in one chunk is answered with one write. A malformed or oversized line gets an error
answer and the connection lives on.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import orjson

from ..events import EventError
from .server import DecisionService

log = logging.getLogger("policyplug.service.socket")

MAX_LINE = 1 << 20  # 1 MiB


def _answer(request_id: Any, **payload: Any) -> bytes:
    return orjson.dumps({"id": request_id, **payload}) + b"\n"


def handle_line(service: DecisionService, line: bytes) -> bytes:
    """One request line -> one answer line. Never raises."""
    try:
        request = orjson.loads(line)
    except (orjson.JSONDecodeError, ValueError, UnicodeDecodeError) as exc:
        service.invalid_requests += 1
        return _answer(None, error=f"not JSON: {exc}")
    if not isinstance(request, dict):
        service.invalid_requests += 1
        return _answer(None, error="a request must be a JSON object")
    request_id = request.get("id")
    try:
        if "event" in request:
            return _answer(request_id, decision=service.decide_json(request["event"]))
        op = request.get("op")
        if op == "status":
            return _answer(request_id, status=service.status())
        if op == "reload":
            return _answer(request_id, reload=service.reload("socket request"))
        service.invalid_requests += 1
        return _answer(request_id, error="a request needs 'event' (or 'op': 'status' | 'reload')")
    except EventError as exc:
        service.invalid_requests += 1
        return _answer(request_id, error=str(exc))
    except Exception as exc:  # a bug must not kill the connection; fail safe, say so
        log.exception("request %r", request_id)
        return _answer(request_id, error=f"internal error: {type(exc).__name__}: {exc}")


class SocketTransport:
    def __init__(self, service: DecisionService, path: str | Path, mode: int = 0o660):
        self.service = service
        self.path = Path(path)
        self.mode = mode
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()  # a stale socket of a previous run
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.server = await asyncio.start_unix_server(self._client, path=str(self.path), limit=MAX_LINE)
        os.chmod(self.path, self.mode)
        log.info("listening on %s", self.path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pending = b""
        discarding = False  # inside an oversized line: drop bytes up to its newline
        try:
            while True:
                chunk = await reader.read(1 << 16)
                if not chunk:
                    break
                pending += chunk
                if discarding:
                    if b"\n" not in pending:
                        pending = b""
                        continue
                    pending = pending.split(b"\n", 1)[1]
                    discarding = False
                if b"\n" not in pending:
                    if len(pending) > MAX_LINE:
                        self.service.invalid_requests += 1
                        writer.write(_answer(None, error=f"request line longer than {MAX_LINE} bytes"))
                        pending = b""
                        discarding = True
                    continue
                *lines, pending = pending.split(b"\n")
                out = [handle_line(self.service, line) if len(line) <= MAX_LINE
                       else _answer(None, error=f"request line longer than {MAX_LINE} bytes")
                       for line in lines if line.strip()]
                if out:
                    writer.write(b"".join(out))
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
