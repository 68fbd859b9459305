"""`policyplug check` warns about policies that would lock a server up (policyplug/lint.py):
refusing every login or every IQ, and the server's own components outside `local domains`."""

from __future__ import annotations

from pathlib import Path

import pytest

from policyplug import load_policy
from policyplug.cli import main
from policyplug.lint import lint_policy, prosody_hosts

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "policyplug" / "demo" / "acme" / "acme.policy"

LOCKED = """policy "locked"
local domains ["example.com"]
default deny "no"
rule internal:
  on message, presence
  when direction == "internal"
  allow
rule inbound:
  when direction == "inbound"
  allow
"""


def messages(text: str, config: Path | None = None) -> list[str]:
    return [d.message for d in lint_policy(load_policy(text=text), config)]


def test_a_policy_refusing_every_login_and_iq_is_warned_about() -> None:
    found = messages(LOCKED)
    assert len(found) == 2
    assert "'login'" in found[0] and "every login would be refused" in found[0]
    assert "'iq'" in found[1] and "deny by default" in found[1]


def test_the_bundled_demo_policy_is_warned_about() -> None:
    # issue 19.3: its internal_traffic rule lists neither login nor iq, and a rule with no `on`
    # (inbound_partners) does not help: a login is internal
    found = messages(
        DEMO.read_text()
        .replace('directory "directory/users.json"', "")
        .replace('file "lists/blocked-domains.txt"', '["blocked.example"]')
    )
    assert any("'login'" in m for m in found) and any("'iq'" in m for m in found)


def test_the_refusing_rule_is_named_and_located() -> None:
    text = (
        LOCKED.replace('default deny "no"', "default allow")
        + 'rule no_logins:\n  on login, iq\n  deny "closed"\n'
    )
    diagnostics = lint_policy(load_policy(text=text))
    assert [d.location.line for d in diagnostics] == [11, 11]
    assert "deny by no_logins" in diagnostics[0].message


def test_logins_allowed_from_some_client_are_not_warned_about() -> None:
    # allowed over TLS only: the first login of a TLS client passes, so nothing to say
    text = LOCKED + "rule tls_logins:\n  on login, iq\n  when client.secure\n  allow\n"
    assert messages(text) == []


@pytest.mark.parametrize("path", sorted((ROOT / "rules").glob("starter-*.policy")), ids=lambda p: p.name)
def test_the_starter_policies_have_nothing_to_warn_about(path: Path) -> None:
    assert lint_policy(load_policy(path)) == []


def test_a_subdomain_of_a_local_domain_named_in_a_test_is_warned_about() -> None:
    text = LOCKED.replace("on message, presence", "on message, presence, login, iq, join") + (
        'test room:\n  join from "a@example.com/x" to "room@conference.example.com/a"\n  expect deny by default\n'
    )
    found = messages(text)
    assert len(found) == 1
    assert "'conference.example.com' is a subdomain of the local domain 'example.com'" in found[0]


def test_a_component_of_the_prosody_configuration_outside_local_domains(tmp_path: Path) -> None:
    config = tmp_path / "prosody.cfg.lua"
    config.write_text(
        'VirtualHost "example.com"\n-- Component "old.example.com"\n'
        'Component "conference.example.com" "muc"\n  Component ( "policy.example.com" )\n'
    )
    assert [(h, loc.line, loc.column) for h, loc in prosody_hosts(config)] == [
        ("example.com", 1, 14),
        ("conference.example.com", 3, 12),
        ("policy.example.com", 4, 16),
    ]
    policy = LOCKED.replace('["example.com"]', '["example.com", "policy.example.com"]').replace(
        "on message, presence", "on message, presence, login, iq"
    )
    found = lint_policy(load_policy(text=policy), config)
    assert [(d.location.line, d.message.split("'")[1]) for d in found] == [(3, "conference.example.com")]


def test_check_prints_the_warnings_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "locked.policy"
    path.write_text(LOCKED)
    config = tmp_path / "prosody.cfg.lua"
    config.write_text('VirtualHost "example.com"\nComponent "policy.example.com"\n')
    assert main(["check", str(path), "--prosody-config", str(config)]) == 0  # warnings do not fail check
    err = capsys.readouterr().err
    assert f"{path}:3:1: warning: the 'login' event" in err
    assert f"{config}:2:12: warning: 'policy.example.com' is served by this Prosody" in err


def test_semantics_points_at_both_adapters_enforcement() -> None:
    # issue 19.7: it said the Kamailio adapter was not written yet
    text = (ROOT / "docs" / "semantics.md").read_text()
    assert "not written yet" not in text
    assert (
        "kamailio.md#enforcement" in text and "## Enforcement" in (ROOT / "docs" / "kamailio.md").read_text()
    )


def test_hosts_of_included_files_are_read(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "muc.cfg.lua").write_text('Component "rooms.example.com" "muc"\n')
    (tmp_path / "main.cfg.lua").write_text('Include "conf.d/*.cfg.lua"\nVirtualHost "example.com"\n')
    assert [h for h, _ in prosody_hosts(tmp_path / "main.cfg.lua")] == ["rooms.example.com", "example.com"]


def test_an_unreadable_prosody_configuration_is_said_not_raised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ok.policy"
    path.write_text(LOCKED.replace('default deny "no"', "default allow"))
    (tmp_path / "binary.cfg.lua").write_bytes(b"\xff\xfe VirtualHost")
    for config in (tmp_path / "missing.cfg.lua", tmp_path / "binary.cfg.lua"):
        assert main(["check", str(path), "--prosody-config", str(config)]) == 0
        err = capsys.readouterr().err
        assert f"{config}:1:1: warning: cannot read the Prosody configuration" in err
