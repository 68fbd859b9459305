"""A real OpenLDAP slapd (Debian's slapd) in a temp dir on a free loopback port, for integration tests.

The server has one mdb database, suffix dc=acme,dc=example, with the memberof overlay (so users
carry memberOf, as in Active Directory), a root DN for the tests to write with, and a read-only
service account `cn=policyplug,dc=acme,dc=example` for policyplug to bind as. `LdapServer.bulk_load`
loads an LDIF offline (slapadd) before start, for large directories.
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

SUFFIX = "dc=acme,dc=example"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PASSWORD = "root-secret"
SERVICE_DN = f"cn=policyplug,{SUFFIX}"
SERVICE_PASSWORD = "service-secret"

BASE_LDIF = f"""dn: {SUFFIX}
objectClass: dcObject
objectClass: organization
o: ACME
dc: acme

dn: ou=people,{SUFFIX}
objectClass: organizationalUnit
ou: people

dn: ou=groups,{SUFFIX}
objectClass: organizationalUnit
ou: groups

dn: {SERVICE_DN}
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: policyplug
userPassword: {SERVICE_PASSWORD}

"""


class LdapServer:
    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        memberof: bool = True,
        size_limit: int = 500,
        unlimited_service: bool = True,
    ):
        self.slapd = require_binary("slapd", "/usr/sbin/slapd")
        self.slapadd = require_binary("slapadd", "/usr/sbin/slapadd")
        self.workdir = workdir
        self.db = workdir / "db"
        self.db.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.conf = workdir / "slapd.conf"
        overlay = "moduleload memberof\n" if memberof else ""
        overlay_db = "overlay memberof\nmemberof-refint TRUE\n" if memberof else ""
        self.conf.write_text(
            "include /etc/ldap/schema/core.schema\ninclude /etc/ldap/schema/cosine.schema\n"
            "include /etc/ldap/schema/inetorgperson.schema\ninclude /etc/ldap/schema/nis.schema\n"
            f"modulepath /usr/lib/ldap\nmoduleload back_mdb\n{overlay}"
            f"pidfile {workdir}/slapd.pid\nargsfile {workdir}/slapd.args\n"
            "access to attrs=userPassword by anonymous auth by * none\n"
            "access to * by users read by * none\n"
            f"sizelimit {size_limit}\n"
            f'database mdb\nmaxsize 2147483648\nsuffix "{SUFFIX}"\nrootdn "{ROOT_DN}"\n'
            f"rootpw {ROOT_PASSWORD}\ndirectory {self.db}\nindex objectClass eq\nindex member eq\n"
            f"{overlay_db}"
            # slapd's default size limit (500) would cut a directory short; policyplug's account reads it all
            + (f'limits dn.exact="{SERVICE_DN}" size=unlimited time=unlimited\n' if unlimited_service else "")
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "slapd.log"
        self._loaded = False

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    def bulk_load(self, ldif: str) -> None:
        """Load entries offline (before start; the base entries come first)."""
        path = self.workdir / "bulk.ldif"
        path.write_text(("" if self._loaded else BASE_LDIF) + ldif)
        result = subprocess.run(
            [self.slapadd, "-f", str(self.conf), "-l", str(path), "-q"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            raise RuntimeError(f"slapadd failed: {result.stdout}{result.stderr}")
        self._loaded = True

    def start(self, timeout: float = 20.0) -> None:
        if not self._loaded:
            self.bulk_load("")
        self._log_file = self.log.open("ab")
        # -d 0: stay in the foreground (no fork), so the test owns the process
        self.proc = subprocess.Popen(
            [self.slapd, "-f", str(self.conf), "-h", self.url + "/", "-d", "0"],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"slapd exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"slapd did not listen within {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if getattr(self, "_log_file", None):
            self._log_file.close()
            self._log_file = None

    def admin(self) -> Any:
        """An ldap3 connection bound as the root DN, to change the directory."""
        from ldap3 import Connection, Server

        return Connection(
            Server(self.url), user=ROOT_DN, password=ROOT_PASSWORD, auto_bind=True, raise_exceptions=True
        )

    def add_user(self, conn: Any, uid: str, mail: str, **attributes: Any) -> str:
        dn = f"uid={uid},ou=people,{SUFFIX}"
        conn.add(dn, ["inetOrgPerson"], {"cn": uid, "sn": uid, "mail": mail, **attributes})
        return dn

    def add_group(self, conn: Any, name: str, members: list[str]) -> str:
        dn = f"cn={name},ou=groups,{SUFFIX}"
        conn.add(dn, ["groupOfNames"], {"cn": name, "member": members})
        return dn

    def config_toml(self, path: Path, *, refresh: float = 1.0, extra: str = "") -> Path:
        """A --directory-ldap file for this server, binding as the service account."""
        password = path.parent / "ldap.password"
        password.write_text(SERVICE_PASSWORD + "\n")
        password.chmod(0o600)
        path.write_text(
            f'url = "{self.url}"\nbind_dn = "{SERVICE_DN}"\npassword_file = "{password}"\n'
            f'users_base = "ou=people,{SUFFIX}"\ngroups_base = "ou=groups,{SUFFIX}"\n'
            f"refresh_interval = {refresh}\ntimeout = 5\n{extra}"
        )
        return path


@pytest.fixture(name="ldap_server")
def ldap_server_fixture(tmp_path: Path) -> Iterator[Callable[..., LdapServer]]:
    """Factory fixture: `ldap_server()` -> a started LdapServer; `ldap_server(start=False)` to bulk-load first."""
    made: list[LdapServer] = []

    def make(start: bool = True, **kwargs: Any) -> LdapServer:
        server = LdapServer(tmp_path / f"slapd{len(made)}", **kwargs)
        made.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in made:
        server.stop()
