"""A real rsyslogd on loopback: receives syslog over UDP on 127.0.0.1 and writes every message to a
file (RFC 5424 layout), as a collector off the host would.

    with RsyslogServer(workdir) as collector:   collector.port, collector.output
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from . import free_port, require_binary


class RsyslogServer:
    def __init__(self, workdir: Path):
        self.binary = require_binary("rsyslogd", "/usr/sbin/rsyslogd")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port("127.0.0.1", socket.SOCK_DGRAM)
        self.output = self.workdir / "collected.log"
        self.config = self.workdir / "rsyslog.conf"
        self.config.write_text(f"""\
global(workDirectory="{self.workdir}")
module(load="imudp")
input(type="imudp" address="127.0.0.1" port="{self.port}")
*.* action(type="omfile" file="{self.output}" template="RSYSLOG_SyslogProtocol23Format")
""")
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RsyslogServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 15.0) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-n", "-f", str(self.config), "-i", str(self.workdir / "rsyslogd.pid")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        # ready when a probe message comes out in the file
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"rsyslogd exited: {self.proc.communicate()[0].decode(errors='replace')}"
                    )
                probe.sendto(b"<13>1 - - probe - - - ready", ("127.0.0.1", self.port))
                time.sleep(0.2)
                if self.output.exists() and b"ready" in self.output.read_bytes():
                    return
        self.stop()
        raise RuntimeError("rsyslogd did not write a probe message")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
