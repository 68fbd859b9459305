"""`policyplug init prosody|kamailio DOMAIN` (policyplug/starter): the repository's starting points,
for one domain, ready to use."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from policyplug import load_policy
from policyplug.cli import main
from policyplug.lint import lint_policy
from policyplug.starter import FILES, render
from policyplug.tester import run_tests
from tests.docs_harness import blocks
from tests.servers import require_binary

ROOT = Path(__file__).resolve().parent.parent
STARTER = ROOT / "policyplug" / "starter"


@pytest.mark.parametrize(
    ("template", "source"),
    [
        ("prosody.policy", ROOT / "rules" / "starter-prosody.policy"),
        ("kamailio.policy", ROOT / "rules" / "starter-kamailio.policy"),
        ("policyplug.service", ROOT / "examples" / "systemd" / "policyplug.service"),
        ("kamailio.toml", ROOT / "examples" / "kamailio" / "policyplug-kamailio.toml"),
    ],
)
def test_the_templates_are_the_repositorys_starting_points(template: str, source: Path) -> None:
    assert (STARTER / template).read_text() == source.read_text(), f"copy {source} to {STARTER / template}"


def test_the_prosody_lines_are_prosody_mds() -> None:
    lua = [b for b in blocks(ROOT / "docs" / "prosody.md") if b.language == "lua"]
    assert (STARTER / "prosody.cfg.lua").read_text() == lua[0].text


def test_init_prosody_writes_a_working_starting_point(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", "prosody", "Corp.Example.ORG", "--dir", str(tmp_path / "etc")]) == 0
    out = capsys.readouterr().out
    etc = tmp_path / "etc"
    assert sorted(p.name for p in etc.iterdir()) == [
        "policyplug.service",
        "prosody-policyplug.cfg.lua",
        "secret.env",
        "site.policy",
    ]
    assert f"wrote {etc / 'site.policy'}" in out and "prosodyctl reload" in out
    policy = load_policy(etc / "site.policy")
    assert policy.local_domains == {
        "corp.example.org",
        "conference.corp.example.org",
        "upload.corp.example.org",
        "policy.corp.example.org",
    }
    outcomes = run_tests(policy)
    assert outcomes and all(o.passed for o in outcomes)
    assert lint_policy(policy) == []
    assert "example.com" not in (etc / "policyplug.service").read_text()
    assert "--component policy.corp.example.org" in (etc / "policyplug.service").read_text()
    assert 'Component "policy.corp.example.org"' in (etc / "prosody-policyplug.cfg.lua").read_text()
    secret = (etc / "secret.env").read_text()
    assert secret.startswith("POLICYPLUG_COMPONENT_SECRET=") and len(secret.strip()) > 40
    assert (etc / "secret.env").stat().st_mode & 0o777 == 0o600
    # the snippet says which hosts the policy must count as local: check agrees with the policy
    assert lint_policy(policy, etc / "prosody-policyplug.cfg.lua") == []


def test_init_kamailio(tmp_path: Path) -> None:
    assert main(["init", "kamailio", "sip.corp.example", "--dir", str(tmp_path)]) == 0
    policy = load_policy(tmp_path / "site.policy")
    assert policy.local_domains == {"sip.corp.example"}
    assert all(o.passed for o in run_tests(policy))
    settings = tomllib.loads((tmp_path / "kamailio.toml").read_text())
    assert settings["policy"] == "/etc/policyplug/site.policy"
    assert not (tmp_path / "secret.env").exists()


def test_nothing_is_overwritten_without_force_and_a_secret_never(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", "prosody", "a.example", "--dir", str(tmp_path)]) == 0
    (tmp_path / "site.policy").write_text("# edited\n")
    secret = (tmp_path / "secret.env").read_text()
    assert main(["init", "prosody", "b.example", "--dir", str(tmp_path)]) == 1
    assert "not overwritten" in capsys.readouterr().err
    assert (tmp_path / "site.policy").read_text() == "# edited\n"
    assert main(["init", "prosody", "b.example", "--dir", str(tmp_path), "--force"]) == 0
    assert '"b.example"' in (tmp_path / "site.policy").read_text()
    assert (tmp_path / "secret.env").read_text() == secret


@pytest.mark.parametrize("domain", ["bad domain", "", "a..b", "-x.example", "x"])
def test_a_bad_domain_is_refused(domain: str, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["init", "prosody", domain, "--dir", str(tmp_path)])
    assert exc.value.code == 2
    assert list(tmp_path.iterdir()) == []


def test_only_example_com_is_replaced() -> None:
    text = render("prosody.policy", "im.corp.example")
    assert "partner.example" in text and "example.com" not in text
    assert set(FILES) == {"prosody", "kamailio"}


def test_the_written_unit_verifies(tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze")
    assert main(["init", "prosody", "corp.example", "--dir", str(tmp_path)]) == 0
    unit = tmp_path / "policyplug.service"
    here = Path(sys.executable).parent / "policyplug"
    unit.write_text(
        unit.read_text().replace(
            "/opt/policyplug/.venv/bin/policyplug",
            str(here if here.exists() else require_binary("policyplug")),
        )
    )
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
