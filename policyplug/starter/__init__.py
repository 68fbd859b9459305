"""`policyplug init prosody|kamailio DOMAIN`: the files of a first deployment, for one domain.

The templates in this folder are the repository's own starting points, kept byte for byte equal
by tests/test_init.py: rules/starter-prosody.policy and rules/starter-kamailio.policy, the unit
examples/systemd/policyplug.service, docs/prosody.md's configuration lines and
examples/kamailio/policyplug-kamailio.toml. Each is written with `example.com` replaced by the
domain. Nothing is overwritten unless asked (`--force`): an operator's edited policy is worth more
than a fresh template.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import sys
import tempfile
from importlib import resources
from pathlib import Path

from ..addresses import AddressError, normalise_domain

TEMPLATE_DOMAIN = "example.com"
# server -> (template, file written, mode)
FILES = {
    "prosody": [
        ("prosody.policy", "site.policy", 0o644),
        ("policyplug.service", "policyplug.service", 0o644),
        ("prosody.cfg.lua", "prosody-policyplug.cfg.lua", 0o644),
    ],
    "kamailio": [("kamailio.policy", "site.policy", 0o644), ("kamailio.toml", "kamailio.toml", 0o644)],
}
_HOSTNAME = re.compile(r"^(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}\Z")

NEXT_STEPS = {
    "prosody": """next:
  1. edit {dir}/site.policy: partners, and every host and component of your Prosody in `local domains`
  2. policyplug check {dir}/site.policy --prosody-config /etc/prosody/prosody.cfg.lua
  3. Include "{dir}/prosody-policyplug.cfg.lua" in prosody.cfg.lua, add "policyplug" to modules_enabled,
     and give Prosody the secret: systemctl edit prosody -> EnvironmentFile={dir}/secret.env
  4. cp {dir}/policyplug.service /etc/systemd/system/ && systemctl daemon-reload && systemctl enable --now policyplug
  5. prosodyctl reload   (docs/prosody.md, docs/service.md)""",
    "kamailio": """next:
  1. edit {dir}/site.policy: partners, and your SIP domains in `local domains`
  2. policyplug check {dir}/site.policy
  3. start Kamailio as docs/kamailio.md says (POLICYPLUG_KAMAILIO_CONFIG={dir}/kamailio.toml
     when {dir} is not /etc/policyplug)""",
}


def render(template: str, domain: str) -> str:
    """A template with its example domain replaced (`example.com`, and its subdomains)."""
    text = resources.files(__package__).joinpath(template).read_text(encoding="utf-8")
    return re.sub(r"(?<![\w-])example\.com(?![\w-])", domain, text)


def _domain(text: str) -> str:
    try:
        domain = normalise_domain(text)
    except (AddressError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"not a domain: {text!r} ({exc})") from exc
    if not _HOSTNAME.match(domain.encode("idna").decode("ascii") if not domain.isascii() else domain):
        raise argparse.ArgumentTypeError(f"not a domain: {text!r}")
    return domain


def _replace(path: Path, text: str, mode: int) -> None:
    """Write `path` as a new file beside it, renamed over it: a symlink or a file someone else owns at
    `path` is replaced, never written through (--dir may be a folder others can write in), and the
    mode is set before the name appears (no umask, no moment of a looser mode)."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            os.fchmod(out.fileno(), mode)
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_files(server: str, domain: str, directory: Path, force: bool = False) -> list[Path]:
    """Write the starting files; returns what was written. Raises FileExistsError before writing
    anything when a file is there already and `force` is false."""
    planned = [(directory / name, render(template, domain), mode) for template, name, mode in FILES[server]]
    secret = directory / "secret.env" if server == "prosody" else None
    # lexists: a planted symlink (dangling or not) is there too; it is replaced, never written through
    existing = [path for path, _, _ in planned if os.path.lexists(path)]
    if existing and not force:
        raise FileExistsError(", ".join(str(p) for p in existing))
    if secret is not None and os.path.islink(secret):
        raise FileExistsError(f"{secret} is a symbolic link: not written through; remove it")
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for path, text, mode in planned:
        _replace(path, text, mode)
        written.append(path)
    if secret is not None and not secret.exists():  # a secret in use is never replaced
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(f"POLICYPLUG_COMPONENT_SECRET={secrets.token_hex(24)}\n")
        written.append(secret)
    return written


def cmd_init(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    try:
        written = write_files(args.server, args.domain, directory, args.force)
    except FileExistsError as exc:
        print(f"policyplug init: already there, not overwritten (--force to replace): {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"policyplug init: cannot write in {directory}: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    print(NEXT_STEPS[args.server].format(dir=directory))
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("init", help="write a starter policy, server settings and unit for one domain")
    p.add_argument("server", choices=sorted(FILES), help="the server policyplug is added to")
    p.add_argument(
        "domain", type=_domain, metavar="DOMAIN", help="the server's domain (replaces example.com)"
    )
    p.add_argument("--dir", default=".", metavar="DIR", help="where to write (default: the current folder)")
    p.add_argument("--force", action="store_true", help="replace files that are there (never secret.env)")
    p.set_defaults(func=cmd_init)
