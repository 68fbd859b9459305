"""A real redis-server on a free loopback port, in a temp dir, for integration tests.

`redis_server` (fixture, offered by tests/integration/conftest.py) starts one per test; `RedisServer.restart()` stops and starts it again on
the same port (a Redis restart mid-load), `stop()` takes it away (an outage).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from . import free_port, require_binary


class RedisServer:
    def __init__(self, workdir: Path, port: int | None = None, extra: list[str] | None = None):
        self.binary = require_binary("redis-server", "/usr/bin/redis-server")
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra = extra or []
        self.log = workdir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> None:
        # no persistence: a restart starts empty, the worst case for a shared window
        command = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--logfile",
            str(self.log),
            "--protected-mode",
            "yes",
            *self.extra,
        ]
        self._run(command, "redis-server", timeout)

    def _run(self, command: list[str], what: str, timeout: float) -> None:
        """Start `command` and wait until it answers PING; an exit or silence is an error with its log."""
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
            if self.ping():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{what} did not answer within {timeout}s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, db=0, socket_timeout=5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture(name="redis_server")
def redis_server_fixture(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Factory fixture: `redis_server()` -> a started RedisServer; all stopped at teardown."""
    started: list[RedisServer] = []

    def make(**kwargs: Any) -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(started)}", **kwargs)
        started.append(server)
        server.start()
        return server

    yield make
    for server in started:
        server.stop()


class SentinelServer(RedisServer):
    """A Redis Sentinel (redis-server --sentinel) watching `master` as service `name`."""

    def __init__(self, workdir: Path, master: RedisServer, name: str = "policyplug"):
        super().__init__(workdir)
        self.master = master
        self.name = name

    def start(self, timeout: float = 15.0) -> None:
        conf = self.workdir / "sentinel.conf"  # Sentinel rewrites its file: one of its own
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.workdir}\nlogfile {self.log}\n"
            f"sentinel monitor {self.name} 127.0.0.1 {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {self.name} 1000\n"
            f"sentinel failover-timeout {self.name} 5000\n"
        )
        self._run([self.binary, str(conf), "--sentinel"], "redis sentinel", timeout)
