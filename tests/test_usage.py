"""The usage store and `policyplug report` (text, CSV, and HTML checked in a real headless Chromium)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from policyplug import Event, load_policy
from policyplug.decision import Decision
from policyplug.events import EventError
from policyplug.service.server import DecisionService
from policyplug.usage.report import COLOURS, build_tables
from policyplug.usage.store import UsageStore
from tests.png import colour_counts
from tests.servers import require_binary

# mark_external tags without deciding (its tag stays on whatever decides later); partners and
# spam add a second tag; internal traffic carries none
POLICY_TEXT = (
    'policy "u"\nlocal domains ["acme.example"]\ndefault deny "no"\n'
    'rule mark_external:\n  when direction != "internal"\n  tag "external"\n'
    'rule internal:\n  when direction == "internal"\n  allow\n'
    'rule partners:\n  when recipient.domain == "partner.example" || sender.domain == "partner.example"\n'
    '  allow\n  tag "partner"\n'
    'rule spam:\n  when sender.domain == "spam.example"\n  drop\n  tag "spam"\n'
)
POLICY = load_policy(text=POLICY_TEXT)

# what fill() leaves in tag_traffic, all hours (the 5 internal messages carry no tag)
TAG_ROWS = [
    ("external", "inbound", "allow", 2),
    ("external", "inbound", "drop", 4),
    ("external", "outbound", "allow", 8),
    ("external", "outbound", "deny", 3),
    ("partner", "inbound", "allow", 2),
    ("partner", "outbound", "allow", 8),
    ("spam", "inbound", "drop", 4),
]

# the schema before tags were counted, as an older policyplug created it
OLD_SCHEMA = """
CREATE TABLE traffic (
    hour TEXT NOT NULL, kind TEXT NOT NULL, direction TEXT NOT NULL, decision TEXT NOT NULL,
    rule TEXT NOT NULL, sender_domain TEXT NOT NULL, recipient_domain TEXT NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (hour, kind, direction, decision, rule, sender_domain, recipient_domain)
);
CREATE TABLE user_messages (
    hour TEXT NOT NULL, user TEXT NOT NULL, direction TEXT NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (hour, user, direction)
);
CREATE INDEX traffic_hour ON traffic (hour);
INSERT INTO traffic VALUES ('2026-11-20T08:00Z', 'message', 'outbound', 'allow', 'partners', 'acme.example',
                            'partner.example', 6);
INSERT INTO user_messages VALUES ('2026-11-20T08:00Z', 'alice@acme.example', 'outbound', 6);
"""


def fill(db: Path) -> None:
    store = UsageStore(db)
    traffic = (
        [("alice@acme.example", "bob@acme.example")] * 5
        + [("alice@acme.example", "d@partner.example")] * 7
        + [("bob@acme.example", "e@evil.example")] * 3
        + [("x@spam.example", "alice@acme.example")] * 4
        + [("d@partner.example", "alice@acme.example")] * 2
    )
    for sender, recipient in traffic:
        event = Event.message(sender, recipient, time="2026-11-24T10:15:00Z")
        store.count(event, POLICY.decide(event), POLICY.activation(event)["direction"])
    late = Event.message("alice@acme.example", "d@partner.example", time="2026-11-25T09:00:00Z")
    store.count(late, POLICY.decide(late), "outbound")
    store.close()


def report(db: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "policyplug", "report", "--db", str(db), *options],
        capture_output=True,
        text=True,
        timeout=60,
    )


def tag_rows(db: Path) -> set[tuple]:
    connection = sqlite3.connect(db)
    try:
        return set(connection.execute("SELECT hour, tag, kind, direction, decision, count FROM tag_traffic"))
    finally:
        connection.close()


def old_store(db: Path) -> None:
    connection = sqlite3.connect(db)
    connection.executescript(OLD_SCHEMA)
    connection.close()


def test_tables_count_what_was_decided(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    fill(db)
    by_title = {t.title: t.rows for t in build_tables(db)}
    assert set(by_title["Traffic by direction and outcome"]) == {
        ("inbound", "allow", 2),
        ("inbound", "drop", 4),
        ("internal", "allow", 5),
        ("outbound", "allow", 8),
        ("outbound", "deny", 3),
    }
    assert by_title["Top external domains"][0] == ("partner.example", 10, 0)
    assert ("spam.example", 4, 4) in by_title["Top external domains"]
    assert by_title["Top denied rules"] == [("spam", "drop", 4), ("default", "deny", 3)]
    assert by_title["Busiest users (messages)"][0] == ("alice@acme.example", 13, 8)
    one_day = {t.title: t.rows for t in build_tables(db, since="2026-11-24", until="2026-11-25")}
    assert ("outbound", "allow", 7) in one_day["Traffic by direction and outcome"]


def test_report_command_text_and_csv(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    fill(db)
    text = subprocess.run(
        [sys.executable, "-m", "policyplug", "report", "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert text.returncode == 0
    assert "Top denied rules" in text.stdout and "partner.example" in text.stdout
    csv_out = subprocess.run(
        [sys.executable, "-m", "policyplug", "report", "--db", str(db), "--format", "csv"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Top external domains,spam.example,4,4" in csv_out.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "policyplug", "report", "--db", str(tmp_path / "none.db")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 1 and "no usage store" in missing.stderr


def test_html_report_renders_its_charts_in_chromium(tmp_path: Path) -> None:
    chromium = require_binary("chromium", "chromium-browser", "/usr/bin/chromium")
    db = tmp_path / "usage.db"
    fill(db)
    page = tmp_path / "report.html"
    subprocess.run(
        [sys.executable, "-m", "policyplug", "report", "--db", str(db), "--html", str(page)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    html = page.read_text()
    for external in (
        "<script",
        "<link",
        "src=",
        "href=",
        "@import",
        "url(",
    ):  # self-contained: nothing fetched
        assert external not in html
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1000,2400",
            "--hide-scrollbars",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    counts = colour_counts(shot.read_bytes())
    for colour in COLOURS:
        rgb = tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
        assert counts[rgb] > 500, f"chart colour {colour} barely visible ({counts[rgb]} pixels)"


def test_store_counts_each_tag_once_per_decision(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    store = UsageStore(db)
    event = Event.message("alice@acme.example", "d@partner.example", time="2026-11-24T10:15:00Z")
    store.count(event, Decision("allow", "r", tags=["a", "b"]), "outbound")
    store.count(event, Decision("allow", "r", tags=["a"]), "outbound")
    store.count(event, Decision("deny", "r", tags=["a", "a"]), "outbound")  # a repeated tag counts once
    store.count(event, Decision("deny", "r"), "outbound")  # no tag: nothing in tag_traffic
    store.count(event, Decision("deny", "r", tags=[]), "outbound")
    store.close()
    assert tag_rows(db) == {
        ("2026-11-24T10:00Z", "a", "message", "outbound", "allow", 2),
        ("2026-11-24T10:00Z", "b", "message", "outbound", "allow", 1),
        ("2026-11-24T10:00Z", "a", "message", "outbound", "deny", 1),
    }
    connection = sqlite3.connect(db)
    assert connection.execute("SELECT SUM(count) FROM traffic").fetchone() == (
        5,
    )  # every decision still counted
    connection.close()


def test_engine_tags_reach_the_store_per_hour(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    fill(db)
    ten, nine = "2026-11-24T10:00Z", "2026-11-25T09:00Z"
    assert tag_rows(db) == {
        (ten, "external", "message", "inbound", "allow", 2),
        (ten, "external", "message", "inbound", "drop", 4),
        (ten, "external", "message", "outbound", "allow", 7),
        (ten, "external", "message", "outbound", "deny", 3),
        (ten, "partner", "message", "inbound", "allow", 2),
        (ten, "partner", "message", "outbound", "allow", 7),
        (ten, "spam", "message", "inbound", "drop", 4),
        (nine, "external", "message", "outbound", "allow", 1),
        (nine, "partner", "message", "outbound", "allow", 1),
    }


def test_service_feeds_tags_to_the_usage_store(tmp_path: Path) -> None:
    policy = tmp_path / "u.policy"
    policy.write_text(POLICY_TEXT)
    db = tmp_path / "usage.db"
    service = DecisionService(policy, usage=UsageStore(db))
    for sender, recipient in [("x@spam.example", "alice@acme.example")] * 2 + [
        ("alice@acme.example", "bob@acme.example")
    ]:
        answer = service.decide_json(
            {"kind": "message", "from": sender, "to": recipient, "time": "2026-11-24T10:15:00Z"}
        )
        assert answer["tags"] == (["external", "spam"] if sender.startswith("x@") else [])
    service.close()
    assert tag_rows(db) == {
        ("2026-11-24T10:00Z", "external", "message", "inbound", "drop", 2),
        ("2026-11-24T10:00Z", "spam", "message", "inbound", "drop", 2),
    }


def test_tag_table_and_its_period(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    fill(db)
    by_title = {t.title: t.rows for t in build_tables(db, top=1)}
    assert by_title["Traffic by tag"] == TAG_ROWS  # in tag, direction, decision order; --top does not cut it
    one_day = {t.title: t.rows for t in build_tables(db, since="2026-11-24", until="2026-11-25")}
    assert ("external", "outbound", "allow", 7) in one_day["Traffic by tag"]
    assert ("partner", "outbound", "allow", 7) in one_day["Traffic by tag"]
    next_day = {t.title: t.rows for t in build_tables(db, since="2026-11-25T00:00:00Z")}
    assert next_day["Traffic by tag"] == [
        ("external", "outbound", "allow", 1),
        ("partner", "outbound", "allow", 1),
    ]
    assert {t.title: t.rows for t in build_tables(db, until="2026-11-24T10:00:00Z")}["Traffic by tag"] == []


def test_report_formats_show_the_tag_rows(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    fill(db)
    text = report(db)
    assert text.returncode == 0
    section = text.stdout.split("Traffic by tag\n", 1)[1].splitlines()
    assert section[0].split() == ["tag", "direction", "decision", "events"]
    assert [line.split() for line in section[2:9]] == [[str(c) for c in row] for row in TAG_ROWS]
    csv_out = report(db, "--format", "csv").stdout.splitlines()
    assert "table,tag,direction,decision,events" in csv_out
    assert [line for line in csv_out if line.startswith("Traffic by tag,")] == [
        "Traffic by tag," + ",".join(str(c) for c in row) for row in TAG_ROWS
    ]
    since = report(db, "--format", "csv", "--since", "2026-11-25").stdout.splitlines()
    assert [line for line in since if line.startswith("Traffic by tag,")] == [
        "Traffic by tag,external,outbound,allow,1",
        "Traffic by tag,partner,outbound,allow,1",
    ]
    page = tmp_path / "report.html"
    assert report(db, "--html", str(page)).returncode == 0
    html = page.read_text()
    assert "<h2>Traffic by tag</h2>" in html and 'aria-label="Traffic by tag"' in html
    assert "<tr><td>partner</td><td>outbound</td><td>allow</td><td>8</td></tr>" in html
    assert "<tr><td>spam</td><td>inbound</td><td>drop</td><td>4</td></tr>" in html
    assert html.count(f'fill="{COLOURS[4]}"') == len(TAG_ROWS)  # one bar a row, in the tag table's colour


def test_old_store_without_tag_table(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    old_store(db)
    # reported as it is: read-only, so the table is not added, and the tag section is empty
    by_title = {t.title: t.rows for t in build_tables(db)}
    assert by_title["Traffic by direction and outcome"] == [("outbound", "allow", 6)]
    assert by_title["Traffic by tag"] == []
    text = report(db)
    assert text.returncode == 0, text.stderr
    assert text.stdout.split("Traffic by tag\n", 1)[1].splitlines()[2] == "  (nothing in this period)"
    csv_out = report(db, "--format", "csv")
    assert csv_out.returncode == 0 and "Traffic by direction and outcome,outbound,allow,6" in csv_out.stdout
    assert "table,tag,direction,decision,events" in csv_out.stdout and "Traffic by tag," not in csv_out.stdout
    page = tmp_path / "report.html"
    assert report(db, "--html", str(page)).returncode == 0
    assert "<h2>Traffic by tag</h2><p>(nothing in this period)</p>" in page.read_text()
    connection = sqlite3.connect(db)
    assert connection.execute("SELECT name FROM sqlite_master WHERE name = 'tag_traffic'").fetchall() == []
    connection.close()
    # opened by the store: the table is added, old counts are kept and new ones add to them
    store = UsageStore(db)
    event = Event.message("alice@acme.example", "d@partner.example", time="2026-11-20T08:30:00Z")
    store.count(event, POLICY.decide(event), "outbound")
    store.close()
    assert tag_rows(db) == {
        ("2026-11-20T08:00Z", "external", "message", "outbound", "allow", 1),
        ("2026-11-20T08:00Z", "partner", "message", "outbound", "allow", 1),
    }
    by_title = {t.title: t.rows for t in build_tables(db)}
    assert by_title["Traffic by direction and outcome"] == [("outbound", "allow", 7)]
    assert by_title["Busiest users (messages)"] == [("alice@acme.example", 7, 7)]
    assert by_title["Traffic by tag"] == [
        ("external", "outbound", "allow", 1),
        ("partner", "outbound", "allow", 1),
    ]
    assert "Traffic by tag,partner,outbound,allow,1" in report(db, "--format", "csv").stdout


# -- reports carry no attacks; the store's path is any path (issue 16) ---------------------------------

ATTACKERS = ["=2+5@evil.example", "+sum(1;2)@evil.example", "-3+4@evil.example"]
# A SIP user part that decodes to a terminal escape or a bidirectional override is an invalid event
# (docs/addresses.md), so such users reach a store only from an older writer: they are put in directly.
CONTROL_USERS = ["\x1b[31m@evil.example", "a\u202eb@evil.example"]
OPEN_POLICY = load_policy(text='policy "open"\nlocal domains ["acme.example"]\ndefault allow\n')


def fill_with_attackers(db: Path) -> None:
    store = UsageStore(db)
    for sender in ATTACKERS:
        recipient = "alice@acme.example"
        for event in (
            Event.message(sender, recipient, time="2026-11-24T10:15:00Z"),
            Event.message(recipient, sender, time="2026-11-24T10:16:00Z"),
        ):
            store.count(event, OPEN_POLICY.decide(event), OPEN_POLICY.activation(event)["direction"])
    store.close()
    for user in CONTROL_USERS:
        with pytest.raises(EventError, match="control or format character"):
            Event.message(
                "sip:" + user.replace("\x1b", "%1b").replace("\u202e", "%e2%80%ae"), "sip:alice@acme.example"
            )
    with sqlite3.connect(db) as connection:
        connection.executemany(
            "INSERT INTO user_messages (hour, user, direction, count) VALUES (?, ?, ?, ?)",
            [("2026-11-24T10:00Z", user, "inbound", 1) for user in CONTROL_USERS],
        )


def test_report_cells_never_run_as_formulas_nor_carry_controls(tmp_path: Path) -> None:
    """Remote senders `=2+5@evil.example`, `+sum(1;2)@...`, `-3+4@...` became CSV cells spreadsheets run
    as formulas, and a SIP user part `%1b[31m` put a raw ESC into the text and CSV reports."""
    import csv
    import io
    import re

    from policyplug.usage.report import csv_cell, render_csv, render_html, render_text

    assert [csv_cell(v) for v in ("@SUM(A1)", "\tx", "\r=1", 7, "ok")] == [
        "'@SUM(A1)",
        "\\x09x",
        "\\x0d=1",
        7,
        "ok",
    ]

    db = tmp_path / "usage.db"
    fill_with_attackers(db)
    tables = build_tables(db)
    users = [row[0] for row in next(t for t in tables if t.title.startswith("Busiest")).rows]
    assert any("\x1b" in u for u in users) and any("=2+5" in u for u in users)  # the store keeps them as sent
    controls = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
    csv_text = render_csv(tables)
    cells = [cell for row in csv.reader(io.StringIO(csv_text)) for cell in row]
    assert (
        "'=2+5@evil.example" in cells and "'-3+4@evil.example" in cells and "'+sum(1;2)@evil.example" in cells
    )
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]
    assert "\\x1b[31m@evil.example" in cells and "a\\u202eb@evil.example" in cells
    for rendered in (csv_text.replace("\r\n", "\n"), render_text(tables), render_html(tables)):
        assert not controls.search(rendered.replace("\n", "")), repr(
            controls.search(rendered.replace("\n", ""))
        )
    assert "\\x1b[31m@evil.example" in render_text(tables) and "\\x1b[31m@evil.example" in render_html(tables)


def test_report_reads_a_store_whatever_its_path(tmp_path: Path) -> None:
    """`report --db 'u#x.db'` gave a traceback and created an empty file `u`: the path went into a
    `file:` URI unescaped, `#x.db?mode=ro` became its fragment, and read-only mode was lost."""
    for name in ("u#x.db", "a?mode=rwc.db", "100%.db", "sp ace.db"):
        fill(tmp_path / name)
        before = set(tmp_path.iterdir())
        result = subprocess.run(
            [sys.executable, "-m", "policyplug", "report", "--db", name, "--format", "csv"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        assert "Top external domains,spam.example,4,4" in result.stdout
        assert set(tmp_path.iterdir()) == before  # nothing created (no `u`, no journal)
    (tmp_path / "notes.txt").write_text("not a database\n" * 100)
    for name, message in (
        ("missing#x.db", "no usage store at missing#x.db"),
        ("notes.txt", "notes.txt is not a readable usage store"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "policyplug", "report", "--db", name],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "missing").exists() and (tmp_path / "notes.txt").read_text().startswith(
        "not a database"
    )
