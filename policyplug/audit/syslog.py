"""Chain heads off the host: each seal (the chain head it covers) sent as an RFC 5424 syslog message.

A collector elsewhere (rsyslog, syslog-ng, a SIEM) keeps them; `policyplug audit verify --heads
FILE` compares a log with what the collector holds. That finds what the file alone cannot show: the
log's tail cut off together with its last seals (docs/audit.md).

Targets (`serve --audit-syslog`): `HOST:PORT` (UDP; `[::1]:514` for IPv6), `tcp://HOST:PORT` (TCP,
octet-counted framing of RFC 6587), or the path of a Unix datagram socket (`/dev/log`). A message
that cannot be sent is counted and logged; the log is written all the same.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("policyplug.audit")

APP_NAME = "policyplug"
MSGID = "audit-head"
FACILITY_AUTHPRIV = 10
SEVERITY_NOTICE = 5


def parse_target(target: str) -> tuple[int, int, Any]:
    """(family, type, address) of a syslog target."""
    if target.startswith("tcp://"):
        kind, rest = socket.SOCK_STREAM, target[len("tcp://") :]
    elif target.startswith("udp://"):
        kind, rest = socket.SOCK_DGRAM, target[len("udp://") :]
    elif "/" in target:
        return socket.AF_UNIX, socket.SOCK_DGRAM, target
    else:
        kind, rest = socket.SOCK_DGRAM, target
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"syslog target {target!r}: expected HOST:PORT, tcp://HOST:PORT or a socket path")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, kind, (host, int(port))


class HeadSender:
    """Sends chain heads as RFC 5424 messages: `<PRI>1 TIME HOST policyplug PID audit-head - JSON`."""

    def __init__(self, target: str, *, hostname: str | None = None):
        self.target = target
        self.family, self.kind, self.address = parse_target(target)
        self.hostname = (hostname or socket.gethostname() or "-").replace(" ", "_")[:255]
        self.stats: dict[str, Any] = {"sent": 0, "errors": 0, "last_error": None}
        self._sock: socket.socket | None = None

    def message(self, head: dict[str, Any]) -> bytes:
        pri = FACILITY_AUTHPRIV * 8 + SEVERITY_NOTICE
        stamp = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
        return (
            f"<{pri}>1 {stamp} {self.hostname} {APP_NAME} {os.getpid()} {MSGID} - ".encode()
            + orjson.dumps(head, option=orjson.OPT_SORT_KEYS)
        )

    def send(self, head: dict[str, Any]) -> bool:
        data = self.message(head)
        for attempt in range(2):  # a collector restarted: reconnect once
            try:
                if self._sock is None:
                    self._sock = socket.socket(self.family, self.kind)
                    self._sock.settimeout(2.0)
                    self._sock.connect(self.address)
                if self.kind == socket.SOCK_STREAM:
                    self._sock.sendall(b"%d " % len(data) + data)
                else:
                    self._sock.send(data)
                self.stats["sent"] += 1
                return True
            except OSError as exc:
                self.close()
                if attempt:
                    self.stats["errors"] += 1
                    self.stats["last_error"] = f"{type(exc).__name__}: {exc}"
                    log.error("audit heads to syslog %s: %s", self.target, self.stats["last_error"])
        return False

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None


def read_heads(path: str | Path) -> list[dict[str, Any]]:
    """The heads a collector wrote to a file, one message a line in any layout that keeps the message
    (rsyslog's default, RFC 5424 or `%msg%`): the JSON object of each line that has one (after our
    MSGID where the line shows it), with `log`, `seq` and `hash`."""
    from .files import bounded_lines, open_regular

    heads = []
    # a collector's file is not trusted to be sane: a FIFO or device is refused, a line over 64 KiB skipped
    for line in bounded_lines(open_regular(Path(path)), 64 << 10):
        if line is None:
            continue
        at = line.find(MSGID.encode())  # after the header; a collector writing only the message has none
        brace = line.find(b"{", max(at, 0))
        if brace < 0:
            continue
        try:
            head = orjson.loads(line[brace:].rstrip(b"\r\n"))
            heads.append(
                {
                    "log": str(head["log"]),
                    "seq": int(head["seq"]),
                    "hash": str(head["hash"]),
                    "index": int(head.get("index", -1)),
                    "time": str(head.get("time", "")),
                    "node": str(head.get("node", "")),
                }
            )
        except (ValueError, KeyError, TypeError):
            continue
    return heads
