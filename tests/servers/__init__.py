"""Helpers that start real servers (Prosody, Kamailio) on loopback for integration tests.

A missing server binary skips the test on a developer's machine, but fails it where
POLICYPLUG_REQUIRE_SERVERS=1 (set by .ci/run), so CI can never pass by skipping.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest

REQUIRE_SERVERS = os.environ.get("POLICYPLUG_REQUIRE_SERVERS") == "1"


def require_binary(name: str, *candidates: str) -> str:
    """Return the path of an executable, or skip (fail in CI) when it is not installed."""
    for candidate in (name, *candidates):
        path = shutil.which(candidate) or (
            candidate if os.path.isfile(candidate) and os.access(candidate, os.X_OK) else None
        )
        if path:
            return path
    message = f"{name} is not installed (apt-get install the Debian package)"
    if REQUIRE_SERVERS:
        pytest.fail(message + " and POLICYPLUG_REQUIRE_SERVERS=1", pytrace=False)
    pytest.skip(message)


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port that is free on loopback right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def service_status(sock: str | Path) -> dict[str, Any]:
    """The `status` op of a decision service listening on the Unix socket `sock`."""
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(10)
        client.connect(str(sock))
        client.sendall(b'{"id": 1, "op": "status"}\n')
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = client.recv(65536)
            if not chunk:
                raise ConnectionError(f"{sock}: closed before answering status")
            answer += chunk
    return json.loads(answer)["status"]
