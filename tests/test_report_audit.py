"""`policyplug report --audit-log`: the usage report counted from audit logs, equal to the usage store's."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

from policyplug import Event, load_policy
from policyplug.audit import AuditWriter
from policyplug.cli import main
from policyplug.usage.store import UsageStore
from tests.test_usage import POLICY_TEXT as USAGE_POLICY_TEXT

# test_usage's policy (tags without deciding, several kinds) with a second local domain
POLICY_TEXT = USAGE_POLICY_TEXT.replace(
    'policy "u"\nlocal domains ["acme.example"]', 'policy "r"\nlocal domains ["acme.example", "acme.test"]'
)
assert POLICY_TEXT != USAGE_POLICY_TEXT
POLICY = load_policy(text=POLICY_TEXT)

# (kind, from, to, time, how many): three hours, four kinds, all four directions, a SIP address the
# engine normalises (sip:%62ob@ACME.Example is bob@acme.example) and a resource
TRAFFIC = [
    ("message", "alice@acme.example/laptop", "bob@acme.example", "2026-11-24T10:05:00Z", 5),
    ("message", "alice@acme.example", "d@partner.example", "2026-11-24T10:15:00Z", 4),
    ("message", "bob@acme.example", "e@evil.example", "2026-11-24T10:25:00Z", 3),
    ("message", "x@spam.example", "alice@acme.example", "2026-11-24T10:35:00Z", 2),
    ("presence", "d@partner.example", "alice@acme.example", "2026-11-24T11:00:00Z", 2),
    ("call", "sip:%62ob@ACME.Example", "sip:carol@acme.test", "2026-11-24T11:30:00Z", 3),
    ("subscribe", "e@evil.example", "bob@acme.example", "2026-11-24T11:59:59Z", 1),
    ("message", "a@other.example", "b@far.example", "2026-11-25T09:00:00Z", 2),
    ("message", "alice@acme.example", "d@partner.example", "2026-11-25T09:45:00+01:00", 1),  # 08:45Z
]
RECORDS = sum(n for *_, n in TRAFFIC)

# the report of TRAFFIC, worked out by hand
CSV = """table,direction,decision,events
Traffic by direction and outcome,inbound,allow,2
Traffic by direction and outcome,inbound,deny,1
Traffic by direction and outcome,inbound,drop,2
Traffic by direction and outcome,internal,allow,8
Traffic by direction and outcome,outbound,allow,5
Traffic by direction and outcome,outbound,deny,3
Traffic by direction and outcome,transit,deny,2
table,domain,events,refused
Top external domains,partner.example,7,0
Top external domains,evil.example,4,4
Top external domains,spam.example,2,2
table,rule,decision,events
Top denied rules,default,deny,6
Top denied rules,spam,drop,2
table,user,messages,external
Busiest users (messages),alice@acme.example,10,5
Busiest users (messages),bob@acme.example,3,3
Busiest users (messages),a@other.example,2,2
Busiest users (messages),x@spam.example,2,2
table,tag,direction,decision,events
Traffic by tag,external,inbound,allow,2
Traffic by tag,external,inbound,deny,1
Traffic by tag,external,inbound,drop,2
Traffic by tag,external,outbound,allow,5
Traffic by tag,external,outbound,deny,3
Traffic by tag,external,transit,deny,2
Traffic by tag,partner,inbound,allow,2
Traffic by tag,partner,outbound,allow,5
Traffic by tag,spam,inbound,drop,2
"""
HEADING = f"from {RECORDS} audit records in 1 file; decisions that were not audited are not counted"


def decided() -> list[tuple[Event, object]]:
    out = []
    for kind, sender, recipient, time, n in TRAFFIC:
        for _ in range(n):
            event = Event.from_json({"kind": kind, "from": sender, "to": recipient, "time": time})
            out.append((event, POLICY.decide(event)))
    return out


def write_log(path: Path, decisions: list[tuple[Event, object]], **options: object) -> None:
    writer = AuditWriter(path, level="all", background=False, **options)  # type: ignore[arg-type]
    for event, decision in decisions:
        writer.submit(event, decision)
    writer.close()


def fill_store(db: Path, decisions: list[tuple[Event, object]]) -> None:
    store = UsageStore(db)  # fed as the decision service feeds it
    for event, decision in decisions:
        store.count(event, decision, POLICY.activation(event)["direction"])
    store.close()


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def report(*options: object) -> Run:
    """`policyplug report OPTIONS` in this process (a subprocess each costs a second of imports)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(["report", *map(str, options)])
        except SystemExit as exit:  # argparse's usage errors
            code = int(exit.code or 0)
    # the csv module ends rows with \r\n; read as a subprocess's text output reads them
    return Run(code, out.getvalue().replace("\r\n", "\n"), err.getvalue())


def from_logs(policy: Path, *logs: Path, options: tuple[str, ...] = ()) -> Run:
    return report("--audit-log", *logs, "--policy", policy, *options)


def tables_of(text: str) -> str:
    """A text report without its heading (which names the source)."""
    return text.split("\n\n", 1)[1]


def policy_file(tmp_path: Path, text: str = POLICY_TEXT) -> Path:
    path = tmp_path / "r.policy"
    path.write_text(text)
    return path


def test_report_from_an_audit_log_equals_the_usage_stores(tmp_path: Path) -> None:
    decisions = decided()
    log, db, policy = tmp_path / "audit.jsonl", tmp_path / "usage.db", policy_file(tmp_path)
    write_log(log, decisions)
    fill_store(db, decisions)
    for period in (
        (),
        ("--since", "2026-11-24T11:00:00Z", "--until", "2026-11-25"),
        ("--since", "2026-11-25"),
        ("--until", "2026-11-24T11:00:00Z"),
        ("--top", "1"),
    ):
        audit_csv, store_csv = (
            from_logs(policy, log, options=("--format", "csv", *period)),
            report("--db", db, "--format", "csv", *period),
        )
        assert audit_csv.returncode == 0, audit_csv.stderr
        assert audit_csv.stdout == store_csv.stdout, period
        audit_text, store_text = from_logs(policy, log, options=period), report("--db", db, *period)
        assert tables_of(audit_text.stdout) == tables_of(store_text.stdout), period
    assert from_logs(policy, log, options=("--format", "csv")).stdout == CSV


def test_text_report_numbers_and_heading(tmp_path: Path) -> None:
    log, policy = tmp_path / "audit.jsonl", policy_file(tmp_path)
    write_log(log, decided())
    text = from_logs(policy, log)
    assert text.returncode == 0 and text.stderr == ""
    lines = text.stdout.splitlines()
    assert lines[:3] == ["policyplug usage report, from the beginning until now", HEADING, ""]
    section = text.stdout.split("Traffic by direction and outcome\n", 1)[1].splitlines()
    assert [line.split() for line in section[2:9]] == [
        ["inbound", "allow", "2"],
        ["inbound", "deny", "1"],
        ["inbound", "drop", "2"],
        ["internal", "allow", "8"],
        ["outbound", "allow", "5"],
        ["outbound", "deny", "3"],
        ["transit", "deny", "2"],
    ]
    tags = text.stdout.split("Traffic by tag\n", 1)[1].splitlines()
    assert [line.split() for line in tags[2:]] == [
        line.split(",")[1:] for line in CSV.splitlines() if line.startswith("Traffic by tag,")
    ]
    # CSV stays one CSV: what the heading says goes to stderr
    csv_out = from_logs(policy, log, options=("--format", "csv"))
    assert csv_out.stderr == f"policyplug report: {HEADING}\n"
    page = tmp_path / "report.html"
    assert from_logs(policy, log, options=("--html", str(page))).returncode == 0
    html = page.read_text()
    assert HEADING in html and "<tr><td>external</td><td>transit</td><td>deny</td><td>2</td></tr>" in html


def test_since_and_until_by_the_events_own_hour(tmp_path: Path) -> None:
    log, policy = tmp_path / "audit.jsonl", policy_file(tmp_path)
    write_log(log, decided())  # every record is written now; the event's time decides its hour
    hour = from_logs(
        policy,
        log,
        options=("--format", "csv", "--since", "2026-11-24T11:00:00Z", "--until", "2026-11-24T12:00:00Z"),
    ).stdout.splitlines()
    assert [line for line in hour if line.startswith("Traffic by direction")] == [
        "Traffic by direction and outcome,inbound,allow,2",
        "Traffic by direction and outcome,inbound,deny,1",
        "Traffic by direction and outcome,internal,allow,3",
    ]
    assert [line for line in hour if line.startswith("Busiest users")] == []  # no message in that hour
    last_day = from_logs(
        policy, log, options=("--format", "csv", "--since", "2026-11-25")
    ).stdout.splitlines()
    assert [line for line in last_day if line.startswith("Traffic by tag")] == [
        "Traffic by tag,external,outbound,allow,1",
        "Traffic by tag,external,transit,deny,2",
        "Traffic by tag,partner,outbound,allow,1",
    ]
    text = from_logs(
        policy, log, options=("--since", "2026-11-24T11:00:00Z", "--until", "2026-11-24T12:00:00Z")
    )
    assert text.stdout.splitlines()[:2] == [
        "policyplug usage report, from 2026-11-24T11:00:00Z until 2026-11-24T12:00:00Z",
        HEADING,
    ]


def test_rotated_files_in_any_order_and_per_process_chains(tmp_path: Path) -> None:
    decisions = decided()
    policy = policy_file(tmp_path)
    rotated = tmp_path / "rotated" / "audit.jsonl"
    write_log(rotated, decisions, max_bytes=2500)
    files = sorted(rotated.parent.iterdir())
    assert len(files) >= 4, "the log was meant to rotate several times"
    random.Random(7).shuffle(files)
    shuffled = from_logs(policy, *files, options=("--format", "csv"))
    assert shuffled.returncode == 0 and shuffled.stdout == CSV
    assert shuffled.stderr == (
        f"policyplug report: from {RECORDS} audit records in {len(files)} files; "
        "decisions that were not audited are not counted\n"
    )  # the chain verified
    # rotated files alone (the current file left out) are checked oldest first, whatever order they came in
    older = [f for f in files if f != rotated]
    alone = from_logs(policy, *older, options=("--format", "csv"))
    assert alone.returncode == 0 and "not intact" not in alone.stderr and "Traffic by tag" in alone.stdout
    # a base name brings its rotations, as for `audit verify`; a folder all of its logs
    assert from_logs(policy, rotated, options=("--format", "csv")).stdout == CSV
    assert from_logs(policy, rotated.parent, options=("--format", "csv")).stdout == CSV
    # per-process logs (an --audit-log path with {pid}): one chain each, counted together
    first, second = tmp_path / "audit-101.jsonl", tmp_path / "audit-202.jsonl"
    write_log(first, decisions[::2])
    write_log(second, decisions[1::2], max_bytes=3000)
    chains = from_logs(policy, second, first, options=("--format", "csv"))
    assert chains.returncode == 0 and chains.stdout == CSV
    assert "not intact" not in chains.stderr and f"from {RECORDS} audit records" in chains.stderr


def test_a_tampered_log_is_warned_about_and_still_reported(tmp_path: Path) -> None:
    log, policy = tmp_path / "audit.jsonl", policy_file(tmp_path)
    write_log(log, decided())
    lines = log.read_text().splitlines(keepends=True)
    removed = json.loads(lines[6])
    assert removed["decision"]["decision"] == "allow" and removed["event"]["to"] == "d@partner.example"
    del lines[6]
    log.write_text("".join(lines))
    result = from_logs(policy, log, options=("--format", "csv"))
    assert result.returncode == 0
    warning = [line for line in result.stderr.splitlines() if "not intact" in line]
    assert warning == [
        f"policyplug report: warning: audit log {log} is not intact, reported all the same: "
        f"{log}:7: record {json.loads(lines[6])['id']} (seq 8) does not follow the record before it "
        "(seq 6): records were removed or reordered"
    ]
    assert "Traffic by direction and outcome,outbound,allow,4" in result.stdout  # one fewer than CSV's 5
    assert f"from {RECORDS - 1} audit records in 1 file" in result.stderr


def test_unreadable_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    log, policy = tmp_path / "audit.jsonl", policy_file(tmp_path)
    write_log(log, decided())
    lines = log.read_text().splitlines(keepends=True)
    lines.insert(3, "{garbage\n")
    lines.insert(
        9,
        json.dumps(
            {
                "event": {"kind": "message", "from": "a@acme.example", "time": "2026-11-24T10:00:00Z"},
                "decision": {"decision": "allow", "rule": None, "tags": []},
            }
        )
        + "\n",
    )  # no `to`
    log.write_text("".join(lines))
    text = from_logs(policy, log)
    assert text.returncode == 0 and "Traceback" not in text.stderr
    assert text.stdout.splitlines()[1:3] == [HEADING, "2 lines skipped: not a readable audit record"]
    assert f"skipped {log}:4: " in text.stderr and f"skipped {log}:10: field 'to': missing" in text.stderr
    assert f"{log}:4: not a valid audit record" in text.stderr  # what verify says of the chain
    assert (
        from_logs(policy, log, options=("--format", "csv")).stdout == CSV
    )  # every real record still counted


def test_a_truncated_last_line_is_a_warning(tmp_path: Path) -> None:
    log, policy = tmp_path / "audit.jsonl", policy_file(tmp_path)
    write_log(log, decided())
    with log.open("a") as f:
        f.write('{"decision":{"decision":"allow"')  # a writer killed halfway through a line
    result = from_logs(policy, log, options=("--format", "csv"))
    assert result.returncode == 0 and result.stdout == CSV
    assert f"warning: {log}:{RECORDS + 1}: last line is incomplete" in result.stderr
    assert "not intact" not in result.stderr and "1 line skipped" in result.stderr


def test_records_of_another_policy_revision_are_noted(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write_log(log, decided())
    edited = policy_file(tmp_path, POLICY_TEXT + "# edited since\n")
    result = from_logs(edited, log, options=("--format", "csv"))
    assert result.returncode == 0 and result.stdout == CSV
    assert f"note: {RECORDS} records were decided by another revision than" in result.stderr


def test_one_source_and_a_policy_for_audit_logs(tmp_path: Path) -> None:
    log, db, policy = tmp_path / "audit.jsonl", tmp_path / "usage.db", policy_file(tmp_path)
    write_log(log, decided())
    fill_store(db, decided())
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "policyplug",
            "report",
            "--audit-log",
            str(log),
            "--policy",
            str(policy),
            "--format",
            "csv",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode == 0 and process.stdout == CSV
    both = report("--db", db, "--audit-log", log, "--policy", policy)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    neither = report("--policy", policy)
    assert neither.returncode == 2 and "one of the arguments --db --audit-log is required" in neither.stderr
    no_policy = report("--audit-log", log)
    assert no_policy.returncode == 2 and "--audit-log needs --policy" in no_policy.stderr
    policy_for_db = report("--db", db, "--policy", policy)
    assert policy_for_db.returncode == 2 and "--policy is only for --audit-log" in policy_for_db.stderr
    missing = from_logs(policy, tmp_path / "none.jsonl")
    assert missing.returncode == 1 and f"no audit log at {tmp_path / 'none.jsonl'}" in missing.stderr
    bad_policy = from_logs(tmp_path / "none.policy", log)
    assert (
        bad_policy.returncode == 1
        and "none.policy" in bad_policy.stderr
        and "Traceback" not in bad_policy.stderr
    )


def test_a_file_named_twice_is_counted_once(tmp_path: Path) -> None:
    log, policy = tmp_path / "audit.jsonl", policy_file(tmp_path)
    write_log(log, decided(), max_bytes=4000)
    files = len(list(tmp_path.glob("audit.jsonl*")))
    twice = from_logs(
        policy,
        log,
        tmp_path,
        log.with_name("audit.jsonl.1"),
        tmp_path / ".." / tmp_path.name / "audit.jsonl",
        options=("--format", "csv"),
    )
    assert twice.returncode == 0 and twice.stdout == CSV and "not intact" not in twice.stderr
    assert f"from {RECORDS} audit records in {files} files;" in twice.stderr
