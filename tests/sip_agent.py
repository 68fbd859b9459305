"""A small SIP user agent over UDP on loopback, for the Kamailio tests where SIPp is awkward.

It sends requests and waits for their final responses, registers, and answers every request
it receives (200 OK, with an SDP answer for INVITE; nothing for ACK), keeping what it got.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field


@dataclass
class SipMessage:
    first_line: str
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes
    source: tuple[str, int] = ("", 0)

    @classmethod
    def parse(cls, raw: bytes, source: tuple[str, int] = ("", 0)) -> SipMessage:
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("utf-8", errors="replace").split("\r\n")
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
        return cls(lines[0], headers, body, raw, source)

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    @property
    def is_response(self) -> bool:
        return self.first_line.startswith("SIP/2.0")

    @property
    def status(self) -> int:
        return int(self.first_line.split()[1]) if self.is_response else 0

    @property
    def method(self) -> str:
        return (
            self.first_line.split()[0] if not self.is_response else (self.header("CSeq") or " ").split()[-1]
        )

    @property
    def uri(self) -> str:
        return self.first_line.split()[1]

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


SDP_AUDIO = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
)
SDP_MSRP_FILE = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=message 40001 TCP/MSRP *\r\na=accept-types:text/plain\r\na=sendonly\r\n"
    "a=path:msrp://127.0.0.1:40001/s1;tcp\r\n"
    'a=file-selector:name:"report.pdf" type:application/pdf size:32349\r\n'
)


@dataclass
class SipAgent:
    user: str
    domain: str
    proxy: tuple[str, int]
    answer_code: int = 200
    received: list[SipMessage] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._responses: dict[str, queue.Queue[SipMessage]] = {}
        self.local_tags: dict[str, str] = {}  # Call-ID -> the To tag this agent answered with
        self._arrived = threading.Condition()
        self._running = True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def aor(self) -> str:
        return f"sip:{self.user}@{self.domain}"

    @property
    def contact(self) -> str:
        return f"sip:{self.user}@127.0.0.1:{self.port}"

    def close(self) -> None:
        self._running = False
        self.sock.close()

    # -- sending --------------------------------------------------------------------------------

    def build(
        self,
        method: str,
        ruri: str,
        *,
        to: str | None = None,
        body: str | bytes = b"",
        content_type: str | None = "text/plain",
        extra: str = "",
        call_id: str | None = None,
        from_uri: str | None = None,
        cseq: int = 1,
        to_tag: str | None = None,
        from_tag: str | None = None,
    ) -> tuple[bytes, str]:
        call_id = call_id or uuid.uuid4().hex
        payload = body.encode() if isinstance(body, str) else body
        to_header = f"<{to or ruri}>" + (f";tag={to_tag}" if to_tag else "")
        lines = [
            f"{method} {ruri} SIP/2.0",
            f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};rport;branch=z9hG4bK{uuid.uuid4().hex[:16]}",
            "Max-Forwards: 70",
            f"From: <{from_uri or self.aor}>;tag={from_tag or uuid.uuid4().hex[:8]}",
            f"To: {to_header}",
            f"Call-ID: {call_id}",
            f"CSeq: {cseq} {method}",
            f"Contact: <{self.contact}>",
        ]
        if payload and content_type:
            lines.append(f"Content-Type: {content_type}")
        raw = (
            "\r\n".join(lines) + "\r\n" + extra + f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode() + payload
        return raw, call_id

    def send_raw(self, raw: bytes, call_id: str | None = None) -> None:
        if call_id:
            self._responses.setdefault(call_id, queue.Queue())
        self.sock.sendto(raw, self.proxy)

    def request(self, method: str, ruri: str, timeout: float = 5.0, **kwargs: object) -> SipMessage | None:
        """Send a request; its final response, or None when none came within the timeout."""
        raw, call_id = self.build(method, ruri, **kwargs)  # type: ignore[arg-type]
        self.send_raw(raw, call_id)
        return self.final_response(call_id, timeout)

    def final_response(self, call_id: str, timeout: float = 5.0) -> SipMessage | None:
        deadline = time.monotonic() + timeout
        responses = self._responses.setdefault(call_id, queue.Queue())
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                response = responses.get(timeout=remaining)
            except queue.Empty:
                return None
            if response.status >= 200:
                if response.method == "INVITE":
                    self._ack(response)
                return response

    def register(self, expires: int = 300) -> SipMessage | None:
        return self.request(
            "REGISTER", f"sip:{self.domain}", to=self.aor, content_type=None, extra=f"Expires: {expires}\r\n"
        )

    def _ack(self, response: SipMessage) -> None:
        via = response.header("Via") or ""
        lines = [
            f"ACK {self.contact} SIP/2.0",
            f"Via: {via}",
            "Max-Forwards: 70",
            f"From: {response.header('From')}",
            f"To: {response.header('To')}",
            f"Call-ID: {response.header('Call-ID')}",
            f"CSeq: {(response.header('CSeq') or '1').split()[0]} ACK",
            "Content-Length: 0",
        ]
        if 200 <= response.status < 300:
            return  # a 2xx ACK is a new transaction; the tests do not need it
        self.sock.sendto(("\r\n".join(lines) + "\r\n\r\n").encode(), self.proxy)

    # -- receiving --------------------------------------------------------------------------------

    def wait_for(self, predicate: object = None, timeout: float = 5.0) -> SipMessage | None:
        """The first received request matching predicate (any request when None)."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                for message in self.received:
                    if predicate is None or predicate(message):  # type: ignore[operator]
                        return message
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._arrived.wait(remaining)

    def _run(self) -> None:
        while self._running:
            try:
                raw, source = self.sock.recvfrom(1 << 17)
            except OSError:
                return
            message = SipMessage.parse(raw, source)
            if message.is_response:
                call_id = message.header("Call-ID") or message.header("i") or ""
                self._responses.setdefault(call_id, queue.Queue()).put(message)
                continue
            if message.method != "ACK":
                self._answer(message, source)
            with self._arrived:
                self.received.append(message)
                self._arrived.notify_all()

    def _answer(self, request: SipMessage, source: tuple[str, int]) -> None:
        body = SDP_AUDIO.encode() if request.method == "INVITE" and self.answer_code == 200 else b""
        lines = [f"SIP/2.0 {self.answer_code} {'OK' if self.answer_code == 200 else 'Whatever'}"]
        for name, value in request.headers:
            if name.lower() in ("via", "v", "from", "f", "call-id", "i", "cseq", "record-route"):
                lines.append(f"{name}: {value}")
        to = request.header("To") or ""
        call_id = request.header("Call-ID") or request.header("i") or ""
        tag = self.local_tags.setdefault(call_id, uuid.uuid4().hex[:8])
        lines.append(f"To: {to}" + ("" if "tag=" in to else f";tag={tag}"))
        lines.append(f"Contact: <{self.contact}>")
        if body:
            lines.append("Content-Type: application/sdp")
        lines.append(f"Content-Length: {len(body)}")
        self.sock.sendto(("\r\n".join(lines) + "\r\n\r\n").encode() + body, source)
