"""Red team of `policyplug init` (docs/cli.md): whatever DOMAIN says, and whatever a local user
left in --dir beforehand, init writes only its own files, only inside --dir, and the secret only
for its owner."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from policyplug.starter import FILES, write_files


def _init(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "policyplug", "init", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    "domain",
    [
        "../x.com",
        "x.com/../../etc",
        "/etc/x.com",
        "a\nb.com",
        'x.com"; os.execute("id") --',
        "x.com\n[routes]",
        "x.com'",
        "x.com]]",
        "x.com\\",
        "x.com #",
        "x.com\u2028y.com",
        "x.com${HOME}",
        "x.com%0a",
    ],
)
@pytest.mark.parametrize("server", sorted(FILES))
def test_a_domain_cannot_inject_or_escape(tmp_path: Path, server: str, domain: str) -> None:
    target = tmp_path / "out"
    result = _init(server, domain, "--dir", str(target))
    assert result.returncode != 0, result.stdout
    assert (
        not target.exists()
        and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
        or not any(tmp_path.iterdir())
    )


@pytest.mark.parametrize("server", sorted(FILES))
@pytest.mark.parametrize("force", [False, True])
def test_a_planted_symlink_is_replaced_not_followed(tmp_path: Path, server: str, force: bool) -> None:
    """Someone who can write in --dir (a shared folder) plants site.policy -> a file elsewhere that does
    not exist yet (or does): init must not write through the link."""
    folder = tmp_path / "shared"
    folder.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    victims = {}
    for _, name, _ in FILES[server]:
        victims[name] = outside / f"victim-{name}"
        (folder / name).symlink_to(victims[name])  # dangling: lexists, not exists
    if server == "prosody":
        (folder / "secret.env").symlink_to(outside / "victim-secret")
    if not force:
        with pytest.raises(FileExistsError):
            write_files(server, "acme.example", folder)
    elif server == "prosody":  # a secret is never replaced, and never written through a link
        with pytest.raises(FileExistsError, match="secret.env is a symbolic link"):
            write_files(server, "acme.example", folder, force=True)
    else:
        write_files(server, "acme.example", folder, force=True)
        for name in victims:
            assert not (folder / name).is_symlink() and "acme.example" in (folder / name).read_text()
    assert not any(outside.iterdir()), list(outside.iterdir())


def test_the_secret_is_its_owners_only_and_no_file_is_group_writable(tmp_path: Path) -> None:
    old = os.umask(0)  # a permissive umask must not loosen anything
    try:
        write_files("prosody", "acme.example", tmp_path)
    finally:
        os.umask(old)
    secret = tmp_path / "secret.env"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    for path in tmp_path.iterdir():
        assert not stat.S_IMODE(path.stat().st_mode) & 0o022, path


def test_check_reads_each_included_prosody_file_once(tmp_path: Path) -> None:
    """Eight configuration files that each Include "*.cfg.lua": 8^8 reads (hours) before, 8 now."""
    for i in range(8):
        (tmp_path / f"h{i}.cfg.lua").write_text(f'Include "*.cfg.lua"\nVirtualHost "h{i}.acme.example"\n')
    policy = tmp_path / "p.policy"
    policy.write_text('policy "p"\nlocal domains ["acme.example"]\ndefault allow\n')
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "policyplug",
            "check",
            str(policy),
            "--prosody-config",
            str(tmp_path / "h0.cfg.lua"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert all(output.count(f"'h{i}.acme.example'") == 1 for i in range(8)), output
