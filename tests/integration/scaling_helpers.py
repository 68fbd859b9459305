"""`policyplug serve` processes for the scaling tests (several services sharing Redis, PostgreSQL, LDAP)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


class Connection:
    """One client connection to a service's socket, pipelining requests."""

    def __init__(self, sock: Path, log: Any = None):
        self.client = socket.socket(socket.AF_UNIX)
        self.client.settimeout(30)
        self.client.connect(str(sock))
        self.buffer = b""
        self.next_id = 0
        self._log = log or (lambda: "")

    def log_text(self) -> str:
        return self._log()

    def close(self) -> None:
        self.client.close()

    def ask_many(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send requests pipelined; their answers, in order."""
        ids = []
        lines = []
        for request in requests:
            self.next_id += 1
            ids.append(self.next_id)
            lines.append(json.dumps({"id": self.next_id, **request}).encode() + b"\n")
        self.client.sendall(b"".join(lines))
        answers: dict[int, dict[str, Any]] = {}
        while len(answers) < len(ids):
            while b"\n" not in self.buffer:
                chunk = self.client.recv(1 << 16)
                assert chunk, "service closed the connection: " + self.log_text()
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\n", 1)
            answer = json.loads(line)
            answers[answer["id"]] = answer
        return [answers[i] for i in ids]


class Service:
    """One `policyplug serve POLICY --socket ... EXTRA...` subprocess, with a client on its socket."""

    def __init__(self, workdir: Path, policy: Path, *extra: str):
        workdir.mkdir(parents=True, exist_ok=True)
        self.sock = workdir / "pp.sock"
        self.log = workdir / "serve.log"
        self._log_file = self.log.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "policyplug",
                "serve",
                str(policy),
                "--socket",
                str(self.sock),
                "--watch-interval",
                "0",
                *extra,
            ],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while not self.sock.exists():
            assert self.proc.poll() is None, self.log_text()
            assert time.monotonic() < deadline, "service did not start: " + self.log_text()
            time.sleep(0.05)
        self.connection = self.connect()

    def connect(self) -> Connection:
        """Another client connection to this service."""
        return Connection(self.sock, self.log_text)

    def ask_many(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return self.connection.ask_many(requests)

    def decide(self, event: dict[str, Any]) -> dict[str, Any]:
        return self.ask_many([{"event": event}])[0]

    def status(self) -> dict[str, Any]:
        return self.ask_many([{"op": "status"}])[0]["status"]

    def reload(self) -> dict[str, Any]:
        return self.ask_many([{"op": "reload"}])[0]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        try:
            self.connection.close()
        finally:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self._log_file.close()
