"""A real Kamailio (Debian `kamailio`, `kamailio-python3-modules`) with the policyplug KEMI adapter.

    server = KamailioServer(workdir, policy_text, routes={"partner.example": "sip:127.0.0.1:5071"}); server.start()
    server.port, server.address            where it listens (UDP and TCP on 127.0.0.1)
    server.audit_log, server.log_text()    the audit log and Kamailio's own log
    server.rpc("app_python.reload")        kamcmd over its control socket

It runs in the foreground (`kamailio -f adapters/kamailio/kamailio.cfg -DD -E`) with the
adapter's settings in a throwaway TOML file, on a free loopback port, and stops at teardown.
"""

from __future__ import annotations

import os
import re
import signal
import site
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from . import free_port, require_binary

ROOT = Path(__file__).resolve().parents[2]
CFG = ROOT / "adapters" / "kamailio" / "kamailio.cfg"
KEMI_SCRIPT = ROOT / "adapters" / "kamailio" / "policyplug_kemi.py"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def python_paths() -> list[str]:
    """Where this interpreter finds policyplug and its dependencies: Kamailio's embedded
    Python (Debian's) is told to look there first."""
    return [*site.getsitepackages(), str(ROOT)]


def embedded_python() -> str | None:
    """The Python version app_python3 is linked with ("3.11"), from its dynamic dependencies."""
    module = next(iter(Path("/usr/lib").glob("*/kamailio/modules/app_python3.so")), None)
    if module is None:
        return None
    linked = subprocess.run(["ldd", str(module)], capture_output=True, text=True).stdout
    match = re.search(r"libpython(\d+\.\d+)", linked)
    return match.group(1) if match else None


def sip_probe(port: int, method: str, uri: str, sender: str, to: str, expect: bytes) -> bool:
    """One request over UDP to Kamailio on `port`; True when the answer starts with `expect`."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.3)
        local = sock.getsockname()[1]
        call_id = uuid.uuid4().hex
        request = (
            f"{method} {uri} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{local};branch=z9hG4bK{call_id}\r\n"
            f"Max-Forwards: 70\r\nFrom: <{sender}>;tag=1\r\nTo: <{to}>\r\n"
            f"Call-ID: {call_id}\r\nCSeq: 1 {method}\r\nContent-Length: 0\r\n\r\n"
        )
        try:
            sock.sendto(request.encode(), ("127.0.0.1", port))
            return sock.recv(4096).startswith(expect)
        except OSError:
            return False


def stop_group(proc: subprocess.Popen[bytes] | None, log_file: Any = None) -> None:
    """Stop a Kamailio started in its own session (all its processes), then close its log file."""
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if log_file:
        log_file.close()


def wait_answering(server: Any, timeout: float, on_exit: Any = None) -> None:
    """Until `server.ping()` answers; a Kamailio that exits or never answers is an error with its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            if on_exit is not None:
                on_exit()
            raise RuntimeError(f"kamailio exited with {server.proc.returncode}:\n{server.log_text()[-4000:]}")
        if server.ping():
            return
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"kamailio did not answer within {timeout}s:\n{server.log_text()[-4000:]}")


class KamailioServer:
    def __init__(
        self,
        workdir: Path,
        policy_text: str,
        *,
        routes: dict[str, str] | None = None,
        children: int = 4,
        audit_level: str = "all",
        allocator: str | None = None,
        shm_mb: int | None = None,
        extra_config: dict[str, Any] | None = None,
        debug: int = 2,
        cpus: str | None = None,
        cfg: Path = CFG,
        env: dict[str, str] | None = None,
    ):
        self.binary = require_binary("kamailio", "/usr/sbin/kamailio")
        if not Path("/usr/lib/x86_64-linux-gnu/kamailio/modules/app_python3.so").exists() and not list(
            Path("/usr/lib").glob("*/kamailio/modules/app_python3.so")
        ):
            require_binary("kamailio-python3-modules (app_python3.so)")
        embedded = embedded_python()
        if embedded and embedded != f"{sys.version_info.major}.{sys.version_info.minor}":
            pytest.fail(
                f"Kamailio embeds Python {embedded}, these tests run on {sys.version.split()[0]}: policyplug's "
                "compiled dependencies would not load in Kamailio; run the tests with that Python",
                pytrace=False,
            )
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port("127.0.0.1", socket.SOCK_DGRAM)
        self.address = f"127.0.0.1:{self.port}"
        self.policy = self.workdir / "test.policy"
        self.policy.write_text(policy_text)
        self.audit_log = self.workdir / "audit.jsonl"
        self.config = self.workdir / "policyplug-kamailio.toml"
        self.log = self.workdir / "kamailio.log"
        self.ctl = self.workdir / "kamailio_ctl"
        self.children = children
        self.allocator = allocator
        self.shm_mb = shm_mb
        self.debug = debug
        self.cpus = cpus  # e.g. "0": run pinned (taskset), for benchmarks
        self.cfg = cfg
        self.env = env or {}  # more environment for Kamailio (PYTHONMALLOC, GLIBC_TUNABLES, ...)
        settings: dict[str, Any] = {
            "policy": str(self.policy),
            "python_path": python_paths(),
            "audit_log": str(self.audit_log),
            "audit_level": audit_level,
            "self_uri": f"sip:{self.address}",
            "server_name": "kamailio.test",
            "state_dir": str(self.workdir / "state"),
            "node": "kamailio-test",
        }
        settings.update(extra_config or {})
        lines = [f"{key} = {_toml(value)}" for key, value in settings.items()]
        lines.append("[routes]")
        lines += [f"{_toml(domain)} = {_toml(hop)}" for domain, hop in (routes or {}).items()]
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        module_dir = next(iter(Path("/usr/lib").glob("*/kamailio/modules/app_python3.so"))).parent
        command = [
            self.binary,
            "-f",
            str(self.cfg),
            "-DD",
            "-E",
            "-w",
            str(self.workdir),
            "-A",
            f"LISTEN=udp:{self.address}",
            "-A",
            f"LISTEN2=tcp:{self.address}",
            "-A",
            f"CHILDREN={self.children}",
            "-A",
            f'KEMI_SCRIPT="{KEMI_SCRIPT}"',
            "-A",
            f'MPATH="{module_dir}/"',
            "-A",
            f'CTL_SOCKET="unix:{self.ctl}"',
            "-A",
            f"DEBUG_LEVEL={self.debug}",
        ]
        if self.allocator:
            command += ["-x", self.allocator]
        if self.shm_mb:
            command += ["-m", str(self.shm_mb)]  # shared memory: transactions wait there a few seconds
        if self.cpus is not None:
            command = ["taskset", "-c", self.cpus, *command]
        env = dict(os.environ, **self.env, POLICYPLUG_KAMAILIO_CONFIG=str(self.config))
        self._log_file = self.log.open("ab")
        self.proc = subprocess.Popen(
            command,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.workdir,
            start_new_session=True,
        )
        wait_answering(self, timeout)

    def ping(self) -> bool:
        """An OPTIONS to the server itself, answered 200 by the adapter's keepalive branch."""
        address = f"sip:{self.address}"
        return sip_probe(self.port, "OPTIONS", address, "sip:ping@test", address, b"SIP/2.0 200")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rpc(self, *args: str) -> str:
        kamcmd = require_binary("kamcmd", "/usr/sbin/kamcmd")
        result = subprocess.run(
            [kamcmd, "-s", f"unix:{self.ctl}", *args], capture_output=True, text=True, timeout=10
        )
        return result.stdout + result.stderr

    def stop(self) -> None:
        stop_group(self.proc, getattr(self, "_log_file", None))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def python_errors(self) -> list[str]:
        """Lines of Kamailio's log where the adapter's Python raised (the adapter catches and logs
        its own errors as 'policyplug: internal error'; app_python3 logs uncaught ones)."""
        return [
            line
            for line in self.log_text().splitlines()
            if "Unhandled exception" in line or "policyplug: internal error" in line
        ]


# -- the benchmark's native-policy anchors (bench/kamailio-native-policy.cfg) ---------------------

NATIVE_POLICY_CFG = ROOT / "bench" / "kamailio-native-policy.cfg"
BENCH_DOMAIN = "bench.example"  # where the benchmark's MESSAGEs go (bench/bench_kamailio.py BENCH_RULE)


def benchmark_tables(n_rules: int = 200) -> dict[str, list[str]]:
    """The message rules' tables of bench_engine.make_policy(n_rules), as a native cfg keeps them:
    blocked domains, local domains, partners a local user may write to (plus the benchmark's
    destination), partners that may write to local users, partners whose messages are checked
    for card numbers, and senders whose messages are checked for "confidential"."""
    tables: dict[str, list[str]] = {
        "blocked": [f"spam{i}.example" for i in range(50)],
        "local": ["acme.example", "eu.acme.example"],
        "partner": [BENCH_DOMAIN],
        "inbound": [],
        "cards": [],
        "watched": [],
    }
    for i in range(n_rules - 3):
        pattern = i % 10
        if pattern in (0, 5):
            tables["partner"].append(f"p{i}.example")
        elif pattern == 1:
            tables["inbound"].append(f"p{i}.example")
        elif pattern == 2:
            tables["watched"].append(f"sip:user{i}@acme.example")
        elif pattern == 4:
            tables["cards"].append(f"p{i}.example")
    return tables


class Rsyslog:
    """A real rsyslogd (Debian `rsyslog`) listening on a Unix socket WORKDIR/dev/log and writing
    every record to WORKDIR/syslog.log; nothing of the host's syslog is touched."""

    def __init__(self, workdir: Path):
        self.binary = require_binary("rsyslogd", "/usr/sbin/rsyslogd")
        self.workdir = Path(workdir)
        self.dev = self.workdir / "dev"
        self.socket = self.dev / "log"
        self.output = self.workdir / "syslog.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, cpus: str | None = None) -> None:
        self.dev.mkdir(parents=True, exist_ok=True)
        (self.workdir / "rsyslog-work").mkdir(exist_ok=True)
        conf = self.workdir / "rsyslog.conf"
        conf.write_text(
            f'global(workDirectory="{self.workdir / "rsyslog-work"}")\n'
            'module(load="imuxsock" SysSock.Use="off")\n'
            f'input(type="imuxsock" Socket="{self.socket}" RateLimit.Interval="0")\n'
            f'*.* action(type="omfile" file="{self.output}")\n'
        )
        command = [self.binary, "-n", "-f", str(conf), "-i", str(self.workdir / "rsyslogd.pid")]
        if cpus is not None:
            command = ["taskset", "-c", cpus, *command]
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=(self.workdir / "rsyslogd.err").open("wb"),
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"rsyslogd did not start: {(self.workdir / 'rsyslogd.err').read_text()[-2000:]}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def records(self, marker: str = "ACC:") -> list[str]:
        return [
            line
            for line in (self.output.read_text(errors="replace") if self.output.exists() else "").splitlines()
            if marker in line
        ]


# In a private mount namespace, /dev is a copy of the devices Kamailio needs plus the rsyslogd's
# socket as /dev/log (libc's syslog() writes only there), so the host's /dev/log is not touched.
_PRIVATE_DEV_LOG = """set -e
mount --make-rprivate /
dev="$1"; shift
for name in null zero random urandom full; do : > "$dev/$name"; mount --bind "/dev/$name" "$dev/$name"; done
mkdir -p "$dev/shm"; mount --bind /dev/shm "$dev/shm"
mount --rbind "$dev" /dev
exec "$@"
"""


class NativePolicyKamailio:
    """Kamailio running bench/kamailio-native-policy.cfg (htable tables, or with `permissions`
    True the permissions module's regex files), relaying what it allows to `next_hop`, its acc
    records going to its own rsyslogd (self.syslog)."""

    def __init__(
        self,
        workdir: Path,
        next_hop: str,
        *,
        permissions: bool = False,
        children: int = 4,
        allocator: str | None = None,
        shm_mb: int | None = None,
        cpus: str | None = None,
        tables: dict[str, list[str]] | None = None,
    ):
        self.binary = require_binary("kamailio", "/usr/sbin/kamailio")
        require_binary("unshare")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port("127.0.0.1", socket.SOCK_DGRAM)
        self.address = f"127.0.0.1:{self.port}"
        self.next_hop = next_hop
        self.permissions = permissions
        self.children, self.allocator, self.shm_mb, self.cpus = children, allocator, shm_mb, cpus
        self.tables = tables or benchmark_tables()
        self.syslog = Rsyslog(self.workdir / "syslog")
        self.log = self.workdir / "kamailio.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _write_tables(self) -> list[str]:
        """The tables in the form the cfg reads; the -A defines naming them."""
        if not self.permissions:
            lines = [f"\t$sht({table}=>{key}) = 1;" for table, keys in self.tables.items() for key in keys]
            (self.workdir / "native-policy-tables.cfg").write_text("\n".join(lines) + "\n")
            return []

        def uri(domain: str) -> str:
            return '"^sip:[^@]*@' + re.escape(domain).replace('"', "") + '$"'

        local = self.tables["local"]
        files: dict[str, tuple[list[str], list[str]]] = {
            # name: (allow lines, deny lines); no match in either is allowed, as allow_routing does
            "blocked": (
                [],
                [f"{uri(d)} : ALL" for d in self.tables["blocked"]]
                + [f"ALL : {uri(d)}" for d in self.tables["blocked"]],
            ),
            "watched": ([], ['"^' + re.escape(a) + '$" : ALL' for a in self.tables["watched"]]),
            "cards": ([], [f"ALL : {uri(d)}" for d in self.tables["cards"]]),
            "policy": (
                [f"{uri(f)} : {uri(t)}" for f in local for t in [*self.tables["partner"], *local]]
                + [f"{uri(f)} : {uri(t)}" for f in self.tables["inbound"] for t in local],
                ["ALL : ALL"],
            ),
        }
        defines = ["-A", "PERMISSIONS"]
        for name, (allow, deny) in files.items():
            base = self.workdir / name
            base.with_suffix(".allow").write_text("\n".join(allow) + "\n")
            base.with_suffix(".deny").write_text("\n".join(deny) + "\n")
            defines += ["-A", f'PERM_{name.upper()}="{base}"']
        return defines

    def start(self, timeout: float = 30.0) -> None:
        self.syslog.start(self.cpus)
        module_dir = next(iter(Path("/usr/lib").glob("*/kamailio/modules/tm.so"))).parent
        cfg = self.workdir / NATIVE_POLICY_CFG.name  # beside its tables (import_file takes a literal path)
        cfg.write_text(NATIVE_POLICY_CFG.read_text())
        command = [
            self.binary,
            "-f",
            str(cfg),
            "-DD",
            "-w",
            str(self.workdir),
            "-A",
            f"LISTEN=udp:{self.address}",
            "-A",
            f"CHILDREN={self.children}",
            "-A",
            f'NEXT_HOP="{self.next_hop}"',
            "-A",
            f'MPATH="{module_dir}/"',
            *self._write_tables(),
        ]
        if self.allocator:
            command += ["-x", self.allocator]
        if self.shm_mb:
            command += ["-m", str(self.shm_mb)]
        if self.cpus is not None:
            command = ["taskset", "-c", self.cpus, *command]
        command = ["unshare", "-m", "sh", "-c", _PRIVATE_DEV_LOG, "sh", str(self.syslog.dev), *command]
        self._log_file = self.log.open("ab")
        self.proc = subprocess.Popen(
            command, stdout=self._log_file, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True
        )
        wait_answering(self, timeout, on_exit=self.syslog.stop)

    def ping(self) -> bool:
        """A MESSAGE from a blocked domain: refused with 403 by the policy route, relayed nowhere."""
        uri = f"sip:x@{BENCH_DOMAIN}"
        return sip_probe(self.port, "MESSAGE", uri, "sip:ping@spam0.example", uri, b"SIP/2.0 403")

    def stop(self) -> None:
        stop_group(self.proc, getattr(self, "_log_file", None))
        self.syslog.stop()

    def log_text(self) -> str:
        """Kamailio's output and what it logged to syslog (everything but acc's records)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text + "\n".join(line for line in self.syslog.records("") if "ACC:" not in line)
