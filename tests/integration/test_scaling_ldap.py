"""Users, groups and attributes from LDAP (`serve --directory-ldap CONFIG.toml`, docs/scaling.md),
against a real OpenLDAP slapd."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from policyplug.directory_ldap import DirectoryConfigError, DirectorySource, LdapConfig, LdapDirectory
from tests.integration.scaling_helpers import Service
from tests.servers.ldap import SUFFIX, LdapServer

WALL_POLICY = """policy "wall"
local domains ["acme.example"]
default allow

rule ethical_wall:
  on message
  when "research" in sender.groups && "trading" in recipient.groups
  deny "ethical wall between research and trading"

rule seniors_only:
  on message
  when recipient.attrs.level == "board" && !("staff" in sender.groups)
  deny "board members take messages from staff only"
"""


def populate(server: LdapServer) -> dict[str, str]:
    conn = server.admin()
    dns = {
        uid: server.add_user(conn, uid, f"{uid.capitalize()}@ACME.example", employeeType="staff-level")
        for uid in ("alice", "bob", "carol", "dave")
    }
    server.add_user(conn, "erin", "erin@acme.example", employeeType="board", departmentNumber=["7", "9"])
    server.add_group(conn, "research", [dns["alice"]])
    traders = server.add_group(conn, "desk-a", [dns["bob"]])
    server.add_group(conn, "trading", [traders, dns["carol"]])  # nested: desk-a's members trade too
    server.add_group(conn, "staff", [dns[u] for u in ("alice", "bob", "carol")])
    conn.unbind()
    return dns


def test_snapshot_has_users_groups_nested_groups_and_attributes(ldap_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = ldap_server()
    populate(server)
    config = LdapConfig.load(
        server.config_toml(
            tmp_path / "ldap.toml",
            extra=('[attributes]\nlevel = "employeeType"\ndepartments = ["departmentNumber"]\n'),
        )
    )
    snapshot, counts = LdapDirectory(config).load()
    assert counts == {"users": 5, "groups": 4, "addresses": 5}
    assert snapshot["alice@acme.example"] == {
        "groups": ["research", "staff"],
        "attrs": {"level": "staff-level", "departments": []},
    }
    assert snapshot["bob@acme.example"]["groups"] == ["desk-a", "staff", "trading"]
    assert snapshot["erin@acme.example"]["attrs"] == {"level": "board", "departments": ["7", "9"]}
    # memberOf (the overlay, as Active Directory keeps it) gives the direct groups the same way
    config = LdapConfig.load(
        server.config_toml(tmp_path / "memberof.toml", extra='member_of_attribute = "memberOf"\n')
    )
    config.groups_base = None  # memberOf alone
    snapshot, _ = LdapDirectory(config).load()
    assert snapshot["carol@acme.example"]["groups"] == ["staff", "trading"]
    assert snapshot["bob@acme.example"]["groups"] == ["desk-a", "staff"]  # memberOf is not transitive


def test_sam_account_name_style_addresses(ldap_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An attribute without a domain (uid here, sAMAccountName in AD) plus address_domain gives the address."""
    server = ldap_server()
    populate(server)
    config = LdapConfig.load(
        server.config_toml(
            tmp_path / "ldap.toml",
            extra=('address_attribute = "uid"\naddress_domain = "chat.acme.example"\n'),
        )
    )
    snapshot, _ = LdapDirectory(config).load()
    assert snapshot["alice@chat.acme.example"]["groups"] == ["research", "staff"]


def test_group_change_reaches_decisions_within_one_refresh_and_outages_keep_the_snapshot(  # type: ignore[no-untyped-def]
    ldap_server, tmp_path: Path
) -> None:
    server = ldap_server()
    dns = populate(server)
    policy = tmp_path / "wall.policy"
    policy.write_text(WALL_POLICY)
    config = server.config_toml(
        tmp_path / "ldap.toml", refresh=1.0, extra='[attributes]\nlevel = "employeeType"\n'
    )
    service = Service(tmp_path / "node", policy, "--directory-ldap", str(config))

    def decide(sender: str, recipient: str) -> str:
        return service.decide({"kind": "message", "from": sender, "to": recipient})["decision"]["decision"]

    try:
        assert decide("alice@acme.example", "carol@acme.example") == "deny"
        assert decide("alice@acme.example", "bob@acme.example") == "deny"  # nested group
        assert decide("alice@acme.example", "dave@acme.example") == "allow"
        assert decide("dave@acme.example", "erin@acme.example") == "deny"  # attribute from LDAP
        assert decide("bob@acme.example", "erin@acme.example") == "allow"
        assert service.status()["cacheable"] is False  # adapters must not cache past a group change

        conn = server.admin()
        conn.modify(f"cn=trading,ou=groups,{SUFFIX}", {"member": [("MODIFY_ADD", [dns["dave"]])]})
        changed_at = time.monotonic()
        while decide("alice@acme.example", "dave@acme.example") != "deny":
            assert time.monotonic() - changed_at < 1.0 + 1.5, (
                "the change took longer than one refresh interval"
            )
            time.sleep(0.05)

        server.stop()
        failures = service.status()["directory"]["failures"]
        deadline = time.monotonic() + 10
        while service.status()["directory"]["failures"] == failures:
            assert time.monotonic() < deadline, "the failed refresh was not counted"
            time.sleep(0.2)
        # the last good snapshot stays in force
        assert decide("alice@acme.example", "dave@acme.example") == "deny"
        assert decide("dave@acme.example", "erin@acme.example") == "deny"
        assert "refresh failed, keeping the snapshot" in service.log_text()

        server.start()
        conn = server.admin()
        conn.modify(f"cn=trading,ou=groups,{SUFFIX}", {"member": [("MODIFY_DELETE", [dns["dave"]])]})
        reloaded = service.reload()  # a reload reads the directory again at once
        assert reloaded["reload"]["ok"]
        deadline = time.monotonic() + 5
        while decide("alice@acme.example", "dave@acme.example") != "allow":
            assert time.monotonic() < deadline, "the directory was not read again after the outage"
            time.sleep(0.05)
    finally:
        service.stop()


def test_a_search_cut_short_by_a_size_limit_is_a_failure_not_a_smaller_directory(  # type: ignore[no-untyped-def]
    ldap_server, tmp_path: Path
) -> None:
    server = ldap_server(size_limit=3, unlimited_service=False)
    populate(server)  # five users
    source = DirectorySource(LdapConfig.load(server.config_toml(tmp_path / "ldap.toml")))
    assert not source.refresh() and source.snapshot is None
    assert "cut short" in source.stats["last_error"] and source.stats["failures"] == 1


def test_config_errors_name_the_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    for text, message in (
        ('url = "ldap://127.0.0.1:1"\n', "field 'users_base' is missing"),
        ('url = "http://x"\nusers_base = "o=x"\n', "field 'url'"),
        ('url = "ldap://x"\nusers_base = "o=x"\npassword = "p"\n', "password_file"),
        ('url = "ldap://x"\nusers_base = "o=x"\nbind_dn = "cn=x"\n', "needs 'password_file'"),
        ('url = "ldap://x"\nusers_base = "o=x"\nrefresh_interval = "soon"\n', "refresh_interval"),
        ('url = "ldap://x"\nusers_base = "o=x"\n[attributes]\nlevel = 3\n', "attributes.level"),
        ("url = [\n", "not valid TOML"),
    ):
        bad.write_text(text)
        with pytest.raises(DirectoryConfigError, match=message) as info:
            LdapConfig.load(bad)
        assert str(bad) in str(info.value)
    policy = tmp_path / "p.policy"
    policy.write_text(WALL_POLICY)
    bad.write_text('url = "ldap://x"\n')
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "policyplug",
            "serve",
            str(policy),
            "--socket",
            str(tmp_path / "s.sock"),
            "--directory-ldap",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "users_base" in result.stderr and "Traceback" not in result.stderr


def test_unreachable_directory_at_start_is_an_error(tmp_path: Path) -> None:
    from tests.servers import free_port

    config = tmp_path / "ldap.toml"
    config.write_text(f'url = "ldap://127.0.0.1:{free_port()}"\nusers_base = "o=x"\ntimeout = 2\n')
    policy = tmp_path / "p.policy"
    policy.write_text(WALL_POLICY)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "policyplug",
            "serve",
            str(policy),
            "--socket",
            str(tmp_path / "s.sock"),
            "--directory-ldap",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "could not read the directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_failed_refresh_keeps_the_last_snapshot_unit() -> None:
    """DirectorySource alone, with a reader that fails on its second read."""

    class Reader:
        calls = 0

        def load(self):  # type: ignore[no-untyped-def]
            self.calls += 1
            if self.calls == 2:
                raise OSError("connection refused")
            return {"a@acme.example": {"groups": [f"g{self.calls}"], "attrs": {}}}, {
                "users": 1,
                "groups": 1,
                "addresses": 1,
            }

    config = LdapConfig(path=Path("x.toml"), urls=["ldap://x"], bind_dn=None, password=None, users_base="o=x")
    source = DirectorySource(config, reader=Reader())
    assert source.refresh() and source.snapshot["a@acme.example"]["groups"] == ["g1"]
    assert not source.refresh() and source.snapshot["a@acme.example"]["groups"] == ["g1"]
    assert source.stats["failures"] == 1 and "connection refused" in source.stats["last_error"]
    assert source.refresh() and source.snapshot["a@acme.example"]["groups"] == ["g3"]


def test_export_feeds_a_json_directory_and_a_failed_export_keeps_the_file(  # type: ignore[no-untyped-def]
    ldap_server, tmp_path: Path
) -> None:
    """`policyplug directory export` writes the `directory "FILE"` format; Kamailio (which runs no
    refresher thread) follows the exported file like any policy file: a group change exported
    reaches its decisions (docs/scaling.md)."""
    from tests.servers.kamailio import KamailioServer
    from tests.sip_agent import SipAgent

    server = ldap_server()
    dns = populate(server)
    config = server.config_toml(tmp_path / "ldap.toml")
    kamailio_dir = tmp_path / "kamailio"
    kamailio_dir.mkdir()
    users = kamailio_dir / "users.json"

    def export() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "policyplug", "directory", "export", str(config), str(users)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    first = export()
    assert first.returncode == 0 and "5 addresses" in first.stdout, first.stderr
    policy_text = WALL_POLICY.replace("default allow\n", 'default allow\ndirectory "users.json"\n')
    from policyplug import Event, load_policy

    policy = load_policy(text=policy_text, base_dir=kamailio_dir)
    assert policy.decide(Event.message("alice@acme.example", "carol@acme.example")).decision == "deny"

    partner = SipAgent("dave", "acme.example", ("127.0.0.1", 9))
    kamailio = KamailioServer(kamailio_dir, policy_text, children=1)
    kamailio.start()
    alice = SipAgent("alice", "acme.example", ("127.0.0.1", kamailio.port))
    partner.proxy = ("127.0.0.1", kamailio.port)
    try:
        assert partner.register().status == 200
        assert alice.request("MESSAGE", "sip:dave@acme.example", body="hello").status == 200
        conn = server.admin()
        conn.modify(f"cn=trading,ou=groups,{SUFFIX}", {"member": [("MODIFY_ADD", [dns["dave"]])]})
        assert export().returncode == 0
        deadline = time.monotonic() + 10
        while alice.request("MESSAGE", "sip:dave@acme.example", body="hello").status != 403:
            assert time.monotonic() < deadline, "Kamailio did not follow the exported directory"
            time.sleep(0.2)
        server.stop()
        before = users.read_bytes()
        failed = export()
        assert (
            failed.returncode == 1 and "left as it was" in failed.stderr and "Traceback" not in failed.stderr
        )
        assert users.read_bytes() == before and not list(kamailio_dir.glob(".users.json.*"))
    finally:
        alice.close()
        partner.close()
        kamailio.stop()
