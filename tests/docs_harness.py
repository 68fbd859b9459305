"""Run the operator documents' fenced blocks as written (tests/test_doc_commands.py).

Every fenced block of DOCUMENTS is found (fences indented in list items too). A block is handled
by its language (`sh` blocks run in a sandbox, `lua` ones go into a real Prosody's configuration,
`toml`/`json` are parsed, `policy` ones loaded and tested, `python` run) unless the line before it
is a marker comment:

    <!-- doc-test: skip REASON -->     not run (output shown, a synopsis, a protocol transcript)
    <!-- doc-test: parse -->           policyplug command lines parsed by policyplug's own CLI
                                       parser, not run (a long-running command another block runs)

A block with neither a handled language nor a marker fails the coverage test, so a block added
to a document is run, or says why not.

The sandbox is what a reader's machine is to the documents: the paths they name are replaced by
temporary folders and the ports by free ones (SUBSTITUTIONS), and commands that change the host
or start a daemon are small programs first on the PATH (SHIMS): `apt-get install` checks that
each named Debian package is installed, `systemctl enable --now UNIT` starts the unit's
ExecStart with its EnvironmentFile in the background, `kamailio` starts the real Kamailio in the
background, `sysctl` and `prosodyctl` are recorded.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [
    ROOT / "README.md",
    ROOT / "docs" / "prosody.md",
    ROOT / "docs" / "kamailio.md",
    ROOT / "examples" / "README.md",
    ROOT / "docs" / "service.md",
    *sorted((ROOT / "examples").glob("*/README*")),
]
HANDLED = {"sh", "bash", "shell", "lua", "toml", "json", "policy", "python"}
_FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)[^\n]*$")
_MARKER = re.compile(r"<!--\s*doc-test:\s*(skip|parse)\b\s*(.*?)\s*-->")


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    text: str
    marker: str | None = None  # "skip" | "parse"
    reason: str = ""

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, dedented by their fence's indentation."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, language = match.group(1), match.group(2), match.group(3).lower()
        body = []
        j = i + 1
        while j < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[j]):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        marker = reason = None
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        if k >= 0 and (m := _MARKER.search(lines[k])):
            marker, reason = m.group(1), m.group(2)
        found.append(Block(path, i + 1, language, "\n".join(body) + "\n", marker, reason or ""))
        i = j + 1
    return found


def all_blocks() -> list[Block]:
    return [block for path in DOCUMENTS for block in blocks(path)]


def command_lines(text: str) -> list[str]:
    """Shell commands of a block: continuation lines joined, comments and blank lines left out."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


# -- the sandbox ---------------------------------------------------------------------------------

SHIM_PROGRAM = r"""
import json, os, re, shlex, subprocess, sys
from pathlib import Path
SANDBOX = Path(os.environ["DOCTEST_SANDBOX"])
name = os.environ.pop("DOCTEST_SHIM")
args = sys.argv[1:]  # the shim's own name is in DOCTEST_SHIM
with open(SANDBOX / "commands.log", "a") as log:
    log.write(json.dumps([name, *args]) + "\n")
substitutions = json.loads((SANDBOX / "substitutions.json").read_text())

def substitute(text):
    for pattern, new in substitutions:
        text = re.sub(pattern, new.replace("\\", "\\\\"), text)
    return text

def launch(name, argv, env):
    out = open(SANDBOX / f"{name}.log", "ab")
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            cwd=SANDBOX)
    (SANDBOX / f"{name}.pid").write_text(str(proc.pid))

if name == "apt-get":
    missing = [p for p in args if not p.startswith("-") and p != "install"
               and subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
    if missing:
        sys.exit(f"apt-get (doc test): {' '.join(missing)} not installed here; the document names them")
elif name == "systemctl":
    words = [a for a in args if not a.startswith("-")]
    if words and words[0] in ("enable", "start", "restart") and ("--now" in args or words[0] != "enable"):
        for unit in words[1:]:
            unit = unit if unit.endswith(".service") else unit + ".service"
            text = substitute((SANDBOX / "etc" / "systemd" / "system" / unit).read_text())
            text = text.replace("\\\n", " ")
            settings = {}
            for line in text.splitlines():
                key, _, value = line.strip().partition("=")
                if value and not line.lstrip().startswith("#"):
                    settings.setdefault(key, []).append(value.strip())
            env = dict(os.environ)
            for path in settings.get("EnvironmentFile", []):
                for line in Path(path.lstrip("-")).read_text().splitlines():
                    if "=" in line and not line.startswith("#"):
                        key, _, value = line.partition("=")
                        env[key.strip()] = value.strip()
            for what, base in (("RuntimeDirectory", "run"), ("StateDirectory", "var/lib"), ("LogsDirectory", "var/log")):
                for directory in settings.get(what, []):
                    (SANDBOX / base / directory).mkdir(parents=True, exist_ok=True)
            launch(unit.removesuffix(".service"), shlex.split(settings["ExecStart"][0]), env)
elif name == "kamailio":
    env = dict(os.environ, POLICYPLUG_KAMAILIO_CONFIG=str(SANDBOX / "etc" / "policyplug" / "kamailio.toml"))
    launch("kamailio", [os.environ["DOCTEST_KAMAILIO"], *args], env)
"""

SHIMS = ("apt-get", "systemctl", "sysctl", "prosodyctl", "kamailio")


@dataclass
class Sandbox:
    """Temporary stand-ins for the machine the documents are followed on."""

    root: Path
    venv: Path
    ports: dict[str, int]
    extra: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.bin = self.root / "bin"
        self.bin.mkdir(parents=True, exist_ok=True)
        for part in ("etc/systemd/system", "etc/sysctl.d", "run", "var/log", "var/lib"):
            (self.root / part).mkdir(parents=True, exist_ok=True)
        program = self.bin / "_shim.py"
        program.write_text(SHIM_PROGRAM)
        for shim in SHIMS:
            path = self.bin / shim
            path.write_text(f'#!/bin/sh\nDOCTEST_SHIM={shim} exec {sys.executable} {program} "$@"\n')
            path.chmod(0o755)
        self.write_substitutions()

    def substitutions(self) -> list[tuple[str, str]]:
        """(pattern, replacement), in order: the documents' paths and ports -> this sandbox's. A path
        is replaced only where it starts (not inside a sandbox path that ends the same way), so a
        file can be rewritten twice."""
        start = r"(?<![\w./-])"
        paths = [
            *self.extra,
            ("/opt/policyplug/.venv", str(self.venv)),
            ("/opt/policyplug", str(ROOT)),
            ("/etc/", f"{self.root}/etc/"),
            ("/run/policyplug", f"{self.root}/run/policyplug"),
            ("/var/log/policyplug", f"{self.root}/var/log/policyplug"),
            ("/var/lib/policyplug", f"{self.root}/var/lib/policyplug"),
            (".venv", str(self.venv)),
        ]  # the README's development environment, in the clone
        pairs = [(start + re.escape(old), new) for old, new in paths]
        pairs += [(rf"(?<!\d){doc_port}(?!\d)", str(port)) for doc_port, port in self.ports.items()]
        return pairs

    def write_substitutions(self) -> None:
        (self.root / "substitutions.json").write_text(json.dumps(self.substitutions()))

    def substitute(self, text: str) -> str:
        for pattern, new in self.substitutions():
            text = re.sub(pattern, new.replace("\\", "\\\\"), text)
        return text

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        # the shims first; then the system's programs, but not this test's own environment nor any
        # other folder with a policyplug in it; the fresh environment's last, as if activated (the
        # README's walkthrough runs bare `policyplug` and `pytest`), so `python3` is the system's
        system_path = [
            p
            for p in env.get("PATH", "").split(":")
            if p and not p.startswith(str(Path(sys.prefix))) and not (Path(p) / "policyplug").exists()
        ]
        env["PATH"] = ":".join([str(self.bin), *system_path, str(self.venv / "bin")])
        env["DOCTEST_SANDBOX"] = str(self.root)
        env["DOCTEST_KAMAILIO"] = "/usr/sbin/kamailio"
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        return env

    def run(self, block: Block, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """A shell block, substituted, in bash with -e (a failing command fails the block), from the
        repository's root (the documents run their commands there or give absolute paths)."""
        script = self.substitute(block.text)
        self.write_substitutions()
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=ROOT,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        self.rewrite_copied_files()
        return result

    def rewrite_copied_files(self) -> None:
        """Configuration files a block copied into the sandbox's /etc name the documents' paths and
        ports: the reader edits them for the machine; here the same substitutions are made."""
        for path in (self.root / "etc").rglob("*"):
            if path.is_file() and path.suffix in (".toml", ".service", ".lua", ".cfg", ".conf", ".env", ""):
                text = path.read_text(encoding="utf-8", errors="replace")
                new = self.substitute(text)
                if new != text:
                    path.write_text(new)

    def commands(self) -> list[list[str]]:
        log = self.root / "commands.log"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def stop(self, name: str) -> None:
        pid_file = self.root / f"{name}.pid"
        if not pid_file.exists():
            return
        pid = int(pid_file.read_text())
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.killpg(pid, signal.SIGKILL)
        pid_file.unlink()

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def parse_policyplug_commands(block: Block) -> list[list[str]]:
    """The policyplug command lines of a `parse` block, each parsed by the CLI's own parser."""
    from policyplug.cli import build_parser

    parsed = []
    for line in command_lines(block.text):
        argv = shlex.split(line)
        if not argv or Path(argv[0]).name != "policyplug":
            continue
        try:
            build_parser().parse_args(argv[1:])
        except SystemExit as exc:
            raise AssertionError(f"{block.name}: policyplug rejects {line!r}") from exc
        parsed.append(argv)
    return parsed
