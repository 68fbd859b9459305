"""The operator documents, followed as written (issue 19: docs that cannot rot).

Every fenced block of README.md, docs/prosody.md, docs/kamailio.md, docs/service.md and
examples/*/README* is run, parsed or says why not (tests/docs_harness.py). The shell blocks run
in a sandbox on one fresh virtual environment per session, made by the documents' own install
commands; then a real Prosody and a real Kamailio, configured by the documents' snippets, enforce
the documents' starter policies. A command or option changed without its document fails here.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from policyplug import load_policy
from policyplug.lint import lint_policy
from policyplug.tester import run_tests
from tests.docs_harness import (
    DOCUMENTS,
    HANDLED,
    ROOT,
    Block,
    Sandbox,
    all_blocks,
    blocks,
    command_lines,
    parse_policyplug_commands,
)
from tests.servers import free_port, require_binary

BLOCKS = all_blocks()
README = ROOT / "README.md"
SERVICE = ROOT / "docs" / "service.md"
PROSODY = ROOT / "docs" / "prosody.md"
KAMAILIO = ROOT / "docs" / "kamailio.md"
TIMINGS: dict[str, float] = {}


def _of(path: Path, language: str | None = None) -> list[Block]:
    return [b for b in blocks(path) if b.marker is None and (language is None or b.language == language)]


# -- fast: every block is covered, and the ones that need no server ------------------------------------------


def test_the_documents_have_blocks() -> None:
    assert {b.path for b in BLOCKS} >= {README, SERVICE, PROSODY, KAMAILIO}
    assert len(BLOCKS) >= 18


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.name)
def test_every_block_is_run_or_says_why_not(block: Block) -> None:
    if block.marker == "skip":
        assert block.reason, f"{block.name}: <!-- doc-test: skip REASON --> needs a reason"
    else:
        assert block.marker == "parse" or block.language in HANDLED, (
            f"{block.name}: a ```{block.language or '(no language)'} block no test runs; give it a language "
            f"({', '.join(sorted(HANDLED))}) or put <!-- doc-test: skip REASON --> on the line before it"
        )


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.marker == "parse"], ids=lambda b: b.name)
def test_parse_blocks_are_command_lines_policyplug_accepts(block: Block) -> None:
    assert parse_policyplug_commands(block), f"{block.name}: no policyplug command in a parse block"


@pytest.mark.parametrize(
    "block", [b for b in BLOCKS if b.marker is None and b.language in ("toml", "json")], ids=lambda b: b.name
)
def test_data_blocks_parse(block: Block) -> None:
    if block.language == "toml":
        assert tomllib.loads(block.text) is not None
    else:
        json.loads(block.text)


@pytest.mark.parametrize(
    "block", [b for b in BLOCKS if b.marker is None and b.language == "policy"], ids=lambda b: b.name
)
def test_policy_blocks_load_and_pass_their_tests(block: Block) -> None:
    policy = load_policy(text=block.text)
    outcomes = run_tests(policy)
    assert all(o.passed for o in outcomes), "\n".join(o.describe() for o in outcomes if not o.passed)
    # a policy an operator copies from these documents locks no one out (issue 19.3)
    assert lint_policy(policy) == [], "\n".join(d.format() for d in lint_policy(policy))


@pytest.mark.parametrize(
    "block", [b for b in BLOCKS if b.marker is None and b.language == "python"], ids=lambda b: b.name
)
def test_python_blocks_run(block: Block, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # their paths are the repository's
    exec(compile(block.text, block.name, "exec"), {})


LUA_BLOCKS = [b for b in BLOCKS if b.marker is None and b.language == "lua"]
MODULE_FILES = sorted((ROOT / "adapters" / "prosody").glob("*.lua"))  # mod_policyplug.lua and its *.lib.lua


@pytest.mark.parametrize("block", LUA_BLOCKS, ids=lambda b: b.name)
def test_lua_blocks_are_prosody_configuration_the_module_reads(block: Block, tmp_path: Path) -> None:
    """Each Prosody snippet compiles as Lua (Prosody's configuration is Lua), and every
    policyplug_* option it sets is one mod_policyplug reads (an option renamed in the module fails
    here); test_prosody_from_the_documents_enforces_the_starter_policy runs prosody.md's in Prosody."""
    lua = require_binary("luac5.4", "luac")
    path = tmp_path / "snippet.cfg.lua"
    path.write_text(block.text)
    result = subprocess.run([lua, "-p", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, f"{block.name}: {result.stderr}"
    read = {
        name
        for module in MODULE_FILES
        for name in re.findall(r'get_option\w*\("(policyplug_\w+)"', module.read_text())
    }
    assert read, "the module reads no policyplug_* option?"
    used = set(re.findall(r"\b(policyplug_\w+)\s*=", block.text))
    assert used <= read, f"{block.name}: options the module does not read: {sorted(used - read)}"


def test_ci_runs_the_readmes_commands() -> None:
    """.ci/run installs and tests the way the README's quick start says (issue 19.2)."""
    quick_start = command_lines(_of(README, "sh")[0].text)
    install, tests = quick_start[0].split("#")[0].strip(), quick_start[1].split("#")[0].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert install.startswith("python3 -m venv .venv && .venv/bin/pip install -e '.[test]'")
    assert "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]'" in ci
    assert tests == ".venv/bin/python -m pytest"
    assert re.search(r"^\.venv/bin/python -m pytest( |$)", ci, re.M)


def test_no_document_installs_into_the_system_python_or_from_an_index() -> None:
    # issue 19.2: `pip install policyplug` (not on an index) and `python3 -m pip install` (PEP 668)
    for path in [
        *{b.path for b in BLOCKS},
        ROOT / "examples" / "systemd" / "policyplug.service",
        ROOT / "examples" / "prosody" / "prosody.cfg.lua",
        ROOT / "examples" / "kamailio" / "policyplug-kamailio.toml",
    ]:
        text = path.read_text()
        assert "pip install policyplug" not in text, path
        assert "python3 -m pip install" not in text, path
        assert "adduser prosody policyplug" not in text, path  # issue 19.1: no user to make by hand
    for block in BLOCKS:  # issue 19.6: no secret on a command line
        assert block.language not in ("sh", "bash") or "--secret" not in block.text, block.name
    for path in (ROOT / "examples").rglob("*"):
        assert not path.is_file() or not re.search(r"--secret\s+\S", path.read_text()), path


# -- slow: the shell blocks, against real servers ---------------------------------------------------------


@pytest.fixture(scope="session")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the documents' install commands make the environment: one per session, made by the
    first of them to run, and installed into again by the others (as a reader following two
    documents on one machine would)."""
    return tmp_path_factory.mktemp("doc-venv") / "venv"


@pytest.fixture
def sandbox(tmp_path: Path, fresh_venv: Path) -> Iterator[Sandbox]:
    """A machine of its own for each document followed (its /etc, /run, /var, ports)."""
    box = Sandbox(
        tmp_path / "machine",
        fresh_venv,
        ports={5060: free_port("127.0.0.1", socket.SOCK_DGRAM), 5347: free_port(), 9464: free_port()},
    )
    box.extra.append(("/etc/prosody/prosody.cfg.lua", str(box.root / "prosody" / "prosody.cfg.lua")))
    yield box
    for name in ("policyplug", "kamailio"):
        box.stop(name)


def run_blocks(box: Sandbox, path: Path, label: str) -> None:
    started = time.monotonic()
    for block in _of(path, "sh") + _of(path, "bash"):
        result = box.run(block)
        assert result.returncode == 0, (
            f"{block.name} failed (exit {result.returncode}) as written:\n{block.text}\n"
            f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
        )
    TIMINGS[label] = TIMINGS.get(label, 0.0) + time.monotonic() - started


@pytest.mark.slow
def test_readme_quick_start_and_walkthrough(sandbox: Sandbox) -> None:
    # the second quick start command is the whole suite, this test's caller (.ci/run runs it;
    # test_ci_runs_the_readmes_commands holds them equal): here it only collects one file
    sandbox.extra.append(
        (".venv/bin/python -m pytest", f"{sandbox.venv}/bin/python -m pytest -q --co tests/test_lint.py")
    )
    try:
        run_blocks(sandbox, README, "README")
    finally:
        sandbox.extra.pop()
    assert (sandbox.venv / "bin" / "policyplug").exists()


@pytest.mark.slow
def test_examples_readmes(sandbox: Sandbox) -> None:
    if not (sandbox.venv / "bin" / "policyplug").exists():  # they begin where the README's quick start ends
        test_readme_quick_start_and_walkthrough(sandbox)
    examples = [path for path in DOCUMENTS if path.is_relative_to(ROOT / "examples")]
    assert ROOT / "examples" / "README.md" in examples
    for path in examples:
        run_blocks(sandbox, path, "examples")
    assert any(b.language == "sh" and b.marker is None for path in examples for b in blocks(path))


def _install_ran(box: Sandbox) -> list[str]:
    return [c[1] if len(c) > 1 else "" for c in box.commands() if c[0] == "apt-get"]


@pytest.mark.slow
def test_prosody_from_the_documents_enforces_the_starter_policy(sandbox: Sandbox) -> None:
    """service.md's install and unit, prosody.md's configuration: a real Prosody, real clients."""
    from tests.integration.prosody_deployment import error_condition, next_message, nothing_arrives
    from tests.servers.prosody import ProsodyServer
    from tests.xmpp_client import TestClient

    started = time.monotonic()
    # the reader's existing Prosody: example.com, with the document's lines added
    lua = "\n".join(b.text for b in _of(PROSODY, "lua"))
    config = sandbox.root / "prosody-policyplug.cfg.lua"
    config.write_text(
        'modules_enabled = { "roster"; "saslauth"; "disco"; "ping"; "posix" }\n'
        + sandbox.substitute(lua)
        + '\nVirtualHost "example.com"\n    modules_enabled = { "policyplug" }\n'
    )
    # the test server sets plugin_paths after the Include: to the document's own value
    assert 'plugin_paths = { "/opt/policyplug/adapters/prosody" }' in lua
    server = ProsodyServer(
        sandbox.root / "prosody",
        include=config,
        plugin_paths=[str(ROOT / "adapters" / "prosody")],
        global_options={"component_ports": [sandbox.ports[5347]]},
    )
    run_blocks(sandbox, SERVICE, "prosody")  # installs, writes the policy and secret, starts the unit
    secret = (sandbox.root / "etc" / "policyplug" / "secret.env").read_text().strip().split("=", 1)[1]
    assert oct((sandbox.root / "etc" / "policyplug" / "secret.env").stat().st_mode & 0o777) == "0o600"
    assert secret not in " ".join(" ".join(c) for c in sandbox.commands())  # never on a command line
    server._env = (lambda original: lambda: dict(original(), POLICYPLUG_COMPONENT_SECRET=secret))(server._env)  # type: ignore[method-assign]
    server.start()
    try:
        for user in ("alice", "bob"):
            server.register(user, "example.com", "pw")
        try:
            server.wait_for_component(timeout=60)  # the unit's service connected with the secret
        except RuntimeError as exc:
            raise AssertionError(
                "the service did not connect; its log:\n" + sandbox.log("policyplug")[-4000:]
            ) from exc

        async def scenario() -> None:
            alice, bob = TestClient("alice@example.com", "pw"), TestClient("bob@example.com", "pw")
            for client in (alice, bob):
                await client.login(server.c2s_port)  # logins and roster IQs allowed
            info = await alice.plugin["xep_0030"].get_info(jid="policy.example.com", timeout=10)
            assert "urn:policyplug:decision:1" in info["disco_info"]["features"]  # issue 19.4
            alice.send_message(mto="bob@example.com", mbody="hello", mtype="chat")
            assert (await next_message(bob))["body"] == "hello"
            alice.send_message(mto="eve@stranger.example", mbody="hi", mtype="chat")
            bounce = await next_message(alice)
            assert error_condition(bounce) == ("policy-violation", "not permitted by the site policy")
            assert await nothing_arrives(bob, 0.5)
            for client in (alice, bob):
                client.disconnect()

        asyncio.run(scenario())
    finally:
        server.stop()
        sandbox.stop("policyplug")
    TIMINGS["prosody"] = time.monotonic() - started
    # issue 19.5: the documented command keeps an audit log and a usage store
    audit = [
        json.loads(line)
        for line in (sandbox.root / "var/log/policyplug/audit.jsonl").read_text().splitlines()
    ]
    assert any(
        r["decision"]["decision"] == "deny" and r["event"]["to"] == "eve@stranger.example" for r in audit
    )
    assert (sandbox.root / "var/lib/policyplug/usage.db").stat().st_size > 0
    assert "python3-venv" in " ".join(_install_ran(sandbox)) or _install_ran(sandbox)
    log = server.log_text()
    assert "connected to the decision service at" in log
    assert [line for line in log.splitlines() if "\terror\t" in line or "traceback" in line.lower()] == []
    print(f"\nProsody, from the documents to an enforced decision: {TIMINGS['prosody']:.1f} s")


@pytest.mark.slow
def test_kamailio_from_the_documents_enforces_the_starter_policy(sandbox: Sandbox) -> None:
    """kamailio.md's commands as written: a real Kamailio, a real SIP user agent."""
    from tests.servers.kamailio import embedded_python
    from tests.sip_agent import SipAgent

    require_binary("kamailio", "/usr/sbin/kamailio")
    assert embedded_python() in (None, "3.11") or embedded_python()
    started = time.monotonic()
    run_blocks(sandbox, KAMAILIO, "kamailio")
    port = sandbox.ports[5060]
    agent = None
    try:
        deadline = time.monotonic() + 60
        agent = SipAgent("alice", "example.com", ("127.0.0.1", port))
        answer = None
        while time.monotonic() < deadline and answer is None:
            assert "kamailio.pid" in {p.name for p in sandbox.root.iterdir()}
            answer = agent.register(expires=60)  # REGISTER: allowed by the starter policy
            if answer is None:
                time.sleep(0.5)
        assert answer is not None, "Kamailio did not answer:\n" + sandbox.log("kamailio")[-4000:]
        assert answer.status == 200, answer.text
        refused = agent.request("MESSAGE", "sip:eve@stranger.example", body="hi")
        assert refused is not None and refused.status == 403, refused and refused.text
        assert "not permitted by the site policy" in (refused.header("Warning") or "")
        TIMINGS["kamailio"] = time.monotonic() - started
        # the refusal is audited where the example settings say (chained within about 100 ms)
        audit_log = sandbox.root / "var/log/policyplug/kamailio-audit.jsonl"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (
            audit_log.exists() and "stranger.example" in audit_log.read_text()
        ):
            time.sleep(0.2)
        assert audit_log.exists() and "stranger.example" in audit_log.read_text()
    finally:
        if agent is not None:
            agent.close()
        sandbox.stop("kamailio")
    log = sandbox.log("kamailio")
    assert "Traceback" not in log, log[-4000:]
    # the documented sysctl is named, not run on the host
    assert any(c[0] == "sysctl" for c in sandbox.commands())
    print(f"\nKamailio, from the documents to an enforced decision: {TIMINGS['kamailio']:.1f} s")
