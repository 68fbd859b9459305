"""A real Prosody (Debian package) on loopback, with a throwaway config and data directory.

    server = ProsodyServer(tmp_path, hosts=["acme.example"], components={"policy.acme.example": "s3cret"})
    server.start(); server.register("alice", "acme.example", "pw"); ...; server.stop()

ProsodyServer(workdir, hosts=["acme.example"], components={jid: secret} (XEP-0114 components),
              extra_modules=[...] (added to the global modules_enabled), plugin_paths=[...],
              host_options={host: {option: value}}, global_options={option: value},
              internal_components={jid: module} (e.g. {"rooms.acme.example": "muc"}),
              log_level="debug" (the benchmark uses "info": logging every stanza costs throughput),
              s2s_peers={domain: s2s_port} (another test server's domain, reached over s2s on loopback),
              include=PATH (an existing config, Included first; then only ports, paths, logging and
              TLS are overridden, so its modules, hosts and components are the ones used))
  .start()        waits until the c2s port (and the component port, where there are components) accepts
  .stop()         SIGTERM, then SIGKILL after 15 s;  .restart()
  .c2s_port, .s2s_port, .component_port
  .register(user, host, password)   prosodyctl with the same config
  .log_text()     Prosody's log so far;  .wait_for_component(logins_before)  after (re)starting a component

The `prosody_server` fixture (offered by tests/integration/conftest.py) is a factory:
`server = prosody_server(hosts=[...], ...)` returns a started server, stopped at teardown.

s2s between two test servers: Prosody finds a remote domain by DNS (SRV `_xmpp-server._tcp`, else
port 5269), through libunbound. `s2s_peers` gives the server's resolver a local SRV record pointing
that domain and every name under it (its components) at `localhost:PORT` (unbound's `local-zone`
redirect and `local-data`, nothing touches /etc/hosts or real DNS), and
enables dialback, which authenticates the servers to each other without certificates. libunbound
takes one `local-data` option per context, so a server can have one peer (enough for the tests).
This needs Prosody to resolve through libunbound: Debian `lua-unbound` (a Recommends of `prosody`,
installed by .ci/run); without it Prosody uses its own resolver and s2s between test servers fails.

Prosody runs as root in the foreground (`run_as_root = true`, `-F`), listens only on 127.0.0.1 on
ports picked free, requires no TLS (test only), stores accounts in plain text in its data dir.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from . import free_port, require_binary


def _lua(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "{ " + ", ".join(_lua(v) for v in value) + " }"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"[{_lua(k)}] = {_lua(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


class ProsodyServer:
    def __init__(
        self,
        workdir: Path,
        hosts: list[str] | None = None,
        components: dict[str, str] | None = None,
        extra_modules: list[str] | None = None,
        plugin_paths: list[str] | None = None,
        host_options: dict[str, dict[str, Any]] | None = None,
        global_options: dict[str, Any] | None = None,
        internal_components: dict[str, str] | None = None,
        log_level: str = "debug",
        s2s_peers: dict[str, int] | None = None,
        include: Path | None = None,
    ):
        self.binary = require_binary("prosody")
        self.prosodyctl = require_binary("prosodyctl")
        self.workdir = Path(workdir)
        self.hosts = hosts or ["acme.example"]
        self.components = components or {}
        self.extra_modules = extra_modules or []
        self.plugin_paths = plugin_paths or []
        self.host_options = host_options or {}
        self.global_options = global_options or {}
        self.internal_components = internal_components or {}
        self.log_level = log_level
        self.s2s_peers = s2s_peers or {}
        self.include = include
        if len(self.s2s_peers) > 1:
            raise ValueError("one s2s peer per test server (one unbound local-data option)")
        self.c2s_port = free_port()
        self.s2s_port = free_port()
        self.component_port = free_port()
        self.config = self.workdir / "prosody.cfg.lua"
        self.log = self.workdir / "prosody.log"
        self.process: subprocess.Popen[bytes] | None = None
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        (self.workdir / "certs").mkdir(exist_ok=True)  # empty: tests run without TLS
        self.write_config()

    def write_config(self) -> None:
        modules = [
            "roster",
            "saslauth",
            "disco",
            "ping",
            "presence",
            "message",
            "iq",
            "posix",
        ] + self.extra_modules
        options: dict[str, Any] = {
            "daemonize": False,
            "run_as_root": True,
            "pidfile": str(self.workdir / "prosody.pid"),
            "data_path": str(self.workdir / "data"),
            "interfaces": ["127.0.0.1"],
            "local_interfaces": ["127.0.0.1"],
            "c2s_ports": [self.c2s_port],
            "s2s_ports": [self.s2s_port],
            "component_ports": [self.component_port],
            "component_interfaces": ["127.0.0.1"],
            "http_ports": [],
            "https_ports": [],
            "c2s_direct_tls_ports": [],
            "s2s_direct_tls_ports": [],
            "certificates": str(self.workdir / "certs"),
            "authentication": "internal_plain",
            "c2s_require_encryption": False,
            "s2s_require_encryption": False,
            "allow_unencrypted_plain_auth": True,
            "s2s_secure_auth": False,
            "storage": "internal",
            "modules_enabled": modules,
            "modules_disabled": ["tls", "s2s_bidi"],
            "plugin_paths": self.plugin_paths,
            "limits": {},
        }
        if self.include is not None:
            # the included config's modules, hosts and components stand; only what a throwaway
            # server on loopback needs differently is overridden
            for key in ("modules_enabled", "authentication", "storage", "limits"):
                del options[key]
        for domain, port in self.s2s_peers.items():
            modules.append("dialback")
            options["use_ipv6"] = False
            # a `redirect` zone answers every name under the domain with the apex's records, so the
            # SRV record reaches the peer's components (policy.DOMAIN, rooms.DOMAIN) too
            options["unbound"] = {
                "resolvconf": False,
                "hoststxt": False,
                "options": {
                    "local-zone:": f"{domain}. redirect",
                    "local-data:": f"{domain}. 60 IN SRV 0 0 {port} localhost.",
                },
            }
        options.update(self.global_options)
        lines = [f"Include {_lua(str(self.include))}"] if self.include is not None else []
        lines += [f"{key} = {_lua(value)}" for key, value in options.items()]
        lines.append(
            f'log = {{ {{ levels = {{ min = {_lua(self.log_level)} }}, to = "file", filename = {_lua(str(self.log))} }} }}'
        )
        for host in self.hosts if self.include is None else []:
            lines.append(f"VirtualHost {_lua(host)}")
            for key, value in self.host_options.get(host, {}).items():
                lines.append(f"    {key} = {_lua(value)}")
        for jid, secret in self.components.items():
            lines.append(f"Component {_lua(jid)}")
            lines.append(f"    component_secret = {_lua(secret)}")
        for jid, module in self.internal_components.items():
            lines.append(f"Component {_lua(jid)} {_lua(module)}")
            for key, value in self.host_options.get(jid, {}).items():
                lines.append(f"    {key} = {_lua(value)}")
        self.config.write_text("\n".join(lines) + "\n")

    def _env(self) -> dict[str, str]:
        return {**os.environ, "HOME": str(self.workdir)}

    def start(self, timeout: float = 30) -> None:
        self.process = subprocess.Popen(
            [self.binary, "-F", "--config", str(self.config)],
            cwd=self.workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self._env(),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = self.process.stdout.read().decode(errors="replace") if self.process.stdout else ""
                raise RuntimeError(
                    f"prosody exited ({self.process.returncode}):\n{output}\n{self.log_text()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.c2s_port), timeout=0.5):
                    if not self.components:
                        return
                with socket.create_connection(("127.0.0.1", self.component_port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"prosody did not open its ports within {timeout} s:\n{self.log_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def register(self, user: str, host: str, password: str) -> None:
        subprocess.run(
            [self.prosodyctl, "--config", str(self.config), "register", user, host, password],
            check=True,
            capture_output=True,
            timeout=60,
            env=self._env(),
        )

    def component_logins(self) -> int:
        """How many times a component has authenticated so far (Prosody logs each)."""
        return self.log_text().count("External component successfully authenticated")

    def wait_for_component(self, logins_before: int = 0, timeout: float = 30) -> None:
        """Wait until a component has authenticated more often than `logins_before`."""
        deadline = time.monotonic() + timeout
        while self.component_logins() <= logins_before:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no component connected within {timeout} s:\n{self.log_text()[-2000:]}")
            time.sleep(0.1)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def link_s2s(a: ProsodyServer, b: ProsodyServer) -> None:
    """Before starting them: let two test servers reach each other's (first) domain over s2s."""
    a.s2s_peers = {b.hosts[0]: b.s2s_port}
    b.s2s_peers = {a.hosts[0]: a.s2s_port}
    a.write_config()
    b.write_config()


@pytest.fixture
def prosody_server(tmp_path: Path) -> Iterator[Callable[..., ProsodyServer]]:
    """Factory fixture: `prosody_server(hosts=[...], components={...}, ...)` -> a started ProsodyServer
    (keyword arguments as ProsodyServer's), each in its own directory under tmp_path; all stopped at teardown."""
    started: list[ProsodyServer] = []

    def make(**kwargs: Any) -> ProsodyServer:
        server = ProsodyServer(tmp_path / f"prosody{len(started)}", **kwargs)
        started.append(server)
        server.start()
        return server

    yield make
    for server in started:
        server.stop()
