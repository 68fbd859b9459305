"""A real PostgreSQL (Debian's postgresql-15 binaries) in a temp dir on a free loopback port.

PostgreSQL refuses to run as root, and CI runs the tests as root: there the cluster belongs to
the `postgres` user (Debian's package creates it) and initdb/pg_ctl run through `runuser`. The
cluster trusts local connections (a throw-away test cluster, loopback only).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from . import REQUIRE_SERVERS, free_port, require_binary


def _bin_dir() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return str(Path(found[-1]).parent)
    return str(Path(require_binary("initdb")).parent)


class PostgresServer:
    def __init__(self, port: int | None = None):
        bin_dir = _bin_dir()
        self.initdb = require_binary(f"{bin_dir}/initdb")
        self.pg_ctl = require_binary(f"{bin_dir}/pg_ctl")
        self.port = port or free_port()
        self.runas: list[str] = []
        owner = None
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                message = "PostgreSQL will not run as root and there is no 'postgres' user"
                if REQUIRE_SERVERS:
                    pytest.fail(message, pytrace=False)
                pytest.skip(message)
            self.runas = [require_binary("runuser", "/usr/sbin/runuser"), "-u", "postgres", "--"]
        # not under pytest's tmp_path: its folders are private to root, out of the postgres user's reach
        self.workdir = Path(tempfile.mkdtemp(prefix="policyplug-pg-"))
        self.data = self.workdir / "data"
        self.log = self.workdir / "postgres.log"
        if owner is not None:
            os.chown(self.workdir, owner.pw_uid, owner.pw_gid)
        self.started = False

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/policyplug"

    def _run(self, *command: str, timeout: float = 120) -> None:
        result = subprocess.run([*self.runas, *command], capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(
                f"{command[0]} failed: {result.stdout}{result.stderr}{self.log_text()[-2000:]}"
            )

    def start(self) -> None:
        if not self.data.exists():
            self._run(
                self.initdb,
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            )
        options = (
            f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50"
        )
        self._run(
            self.pg_ctl, "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start"
        )
        self.started = True
        if not getattr(self, "_created", False):
            import psycopg

            with psycopg.connect(
                f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True
            ) as db:
                db.execute("CREATE DATABASE policyplug")
            self._created = True

    def stop(self, mode: str = "fast") -> None:
        if self.started:
            self._run(self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "stop")
            self.started = False

    def restart(self) -> None:
        self.stop()
        self.start()

    def connect(self) -> Any:
        import psycopg

        return psycopg.connect(self.url, autocommit=True)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def remove(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(name="postgres_server")
def postgres_server_fixture() -> Iterator[Callable[..., PostgresServer]]:
    """Factory fixture: `postgres_server()` -> a started PostgresServer with an empty database
    `policyplug` (its `url`); all stopped and removed at teardown."""
    started: list[PostgresServer] = []

    def make(**kwargs: Any) -> PostgresServer:
        server = PostgresServer(**kwargs)
        started.append(server)
        server.start()
        return server

    yield make
    for server in started:
        server.remove()
