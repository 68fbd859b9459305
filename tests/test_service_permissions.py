"""Who can ask the decision service over its Unix socket (docs/service.md, "Who may ask"): the
socket is mode 0660, so its owner and its group connect and anybody else is refused by the kernel.
Checked with a real `policyplug serve` and clients running as another user (setpriv), so root's
exemption from permission checks does not hide anything."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import require_binary

NOBODY = 65534
CONNECT = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_UNIX)\n"
    "try:\n"
    "    s.connect(sys.argv[1])\n"
    "except PermissionError:\n"
    "    print('refused'); sys.exit(0)\n"
    's.sendall(b\'{"id": 1, "event": {"kind": "message", "from": "a@acme.example", "to": "b@acme.example"}}\\n\')\n'
    "print(s.makefile().readline().strip())\n"
)


@pytest.fixture
def served() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to run clients as other users")
    require_binary("setpriv")
    # a directory everyone may enter: the socket's own mode is what decides
    folder = Path(tempfile.mkdtemp(prefix="policyplug-perm-"))
    folder.chmod(0o755)
    policy = folder / "p.policy"
    policy.write_text('policy "perm"\nlocal domains ["acme.example"]\ndefault allow\n')
    sock = folder / "s.sock"
    service = subprocess.Popen(
        [sys.executable, "-m", "policyplug", "serve", str(policy), "--socket", str(sock)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert service.poll() is None and time.monotonic() < deadline, "the service did not start"
            time.sleep(0.1)
        yield sock
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=20)
        shutil.rmtree(folder, ignore_errors=True)


def connect_as(uid: int, gid: int, sock: Path) -> str:
    python = shutil.which("python3", path="/usr/bin:/bin") or "/usr/bin/python3"
    result = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", python, "-c", CONNECT, str(sock)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_socket_is_for_its_owner_and_group_only(served: Path) -> None:
    info = served.stat()
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o660
    # another user in the socket's group: answered
    answer = connect_as(NOBODY, info.st_gid, served)
    assert '"decision":{' in answer and '"decision":"allow"' in answer, answer
    # another user outside it: the kernel refuses the connection
    assert connect_as(NOBODY, NOBODY, served) == "refused"
