"""examples/systemd/policyplug.service: systemd accepts it (`systemd-analyze verify`), its hardening
scores what docs/service.md says (`systemd-analyze security`), and its ExecStart is a command line
policyplug's own parser accepts (an option renamed in the CLI fails here, not on a server)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from policyplug.cli import build_parser
from tests.servers import require_binary

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "examples" / "systemd" / "policyplug.service"
SERVICE_DOC = ROOT / "docs" / "service.md"
VENV_BIN = "/opt/policyplug/.venv/bin/"  # where docs/service.md installs policyplug


def unit_settings(text: str) -> dict[str, list[str]]:
    """Key -> values of a unit file (continuation lines joined, comments left out)."""
    settings: dict[str, list[str]] = {}
    joined = re.sub(r"\\\n\s*", " ", text)
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def installed_copy(tmp_path: Path) -> Path:
    """The unit as an operator installs it, with ExecStart pointing at this test's policyplug
    (verify checks that the program exists and is executable)."""
    here = Path(sys.executable).parent / "policyplug"
    program = here if here.exists() else Path(require_binary("policyplug"))
    unit = tmp_path / "policyplug.service"
    unit.write_text(UNIT.read_text().replace(VENV_BIN + "policyplug", str(program)))
    return unit


def test_the_unit_needs_no_hand_made_user_and_keeps_secrets_off_the_command_line() -> None:
    settings = unit_settings(UNIT.read_text())
    assert settings["DynamicUser"] == ["yes"]
    for directory in ("RuntimeDirectory", "StateDirectory", "LogsDirectory"):
        assert settings[directory] == ["policyplug"]
    assert settings["Group"] == ["prosody"]  # the socket's group: Prosody opens it
    exec_start = settings["ExecStart"][0]
    assert "--secret" not in exec_start
    assert settings["EnvironmentFile"] == ["/etc/policyplug/secret.env"]
    assert exec_start.startswith(VENV_BIN)


def test_exec_start_is_a_command_line_policyplug_accepts() -> None:
    argv = shlex.split(unit_settings(UNIT.read_text())["ExecStart"][0])
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve"
    # every path it writes is under a directory the unit gives it (ProtectSystem=strict)
    assert str(args.socket).startswith("/run/policyplug/")
    assert str(args.audit_log).startswith("/var/log/policyplug/")
    assert str(args.usage_db).startswith("/var/lib/policyplug/")


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze")
    result = subprocess.run(
        [analyze, "verify", str(installed_copy(tmp_path))], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.strip() == "", result.stderr  # no warning either


def test_the_documented_security_score_is_the_units(tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze")
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(installed_copy(tmp_path))],
        capture_output=True,
        text=True,
    )
    measured = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert measured, result.stdout + result.stderr
    documented = re.search(r"`systemd-analyze security`[^.]*?scores (\d+\.\d)", SERVICE_DOC.read_text())
    assert documented, "docs/service.md should give the unit's systemd-analyze security score"
    assert documented.group(1) == measured.group(1)
    assert float(measured.group(1)) <= 2.0  # "SAFE"/"OK" on systemd's scale
