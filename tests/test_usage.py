"""The usage store and `policyplug report` (text, CSV, and HTML checked in a real headless Chromium)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from policyplug import Event, load_policy
from policyplug.usage.report import COLOURS, build_tables
from policyplug.usage.store import UsageStore
from tests.png import colour_counts
from tests.servers import require_binary

POLICY = load_policy(text='policy "u"\nlocal domains ["acme.example"]\ndefault deny "no"\n'
                          'rule internal:\n  when direction == "internal"\n  allow\n'
                          'rule partners:\n  when recipient.domain == "partner.example" || sender.domain == "partner.example"\n  allow\n'
                          'rule spam:\n  when sender.domain == "spam.example"\n  drop\n')


def fill(db: Path) -> None:
    store = UsageStore(db)
    traffic = ([("alice@acme.example", "bob@acme.example")] * 5 + [("alice@acme.example", "d@partner.example")] * 7
               + [("bob@acme.example", "e@evil.example")] * 3 + [("x@spam.example", "alice@acme.example")] * 4
               + [("d@partner.example", "alice@acme.example")] * 2)
    for sender, recipient in traffic:
        event = Event.message(sender, recipient, time="2026-11-24T10:15:00Z")
        store.count(event, POLICY.decide(event), POLICY.activation(event)["direction"])
    late = Event.message("alice@acme.example", "d@partner.example", time="2026-11-25T09:00:00Z")
    store.count(late, POLICY.decide(late), "outbound")
    store.close()


def test_tables_count_what_was_decided(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    fill(db)
    by_title = {t.title: t.rows for t in build_tables(db)}
    assert set(by_title["Traffic by direction and outcome"]) == {
        ("inbound", "allow", 2), ("inbound", "drop", 4), ("internal", "allow", 5),
        ("outbound", "allow", 8), ("outbound", "deny", 3)}
    assert by_title["Top external domains"][0] == ("partner.example", 10, 0)
    assert ("spam.example", 4, 4) in by_title["Top external domains"]
    assert by_title["Top denied rules"] == [("spam", "drop", 4), ("default", "deny", 3)]
    assert by_title["Busiest users (messages)"][0] == ("alice@acme.example", 13, 8)
    one_day = {t.title: t.rows for t in build_tables(db, since="2026-11-24", until="2026-11-25")}
    assert ("outbound", "allow", 7) in one_day["Traffic by direction and outcome"]


def test_report_command_text_and_csv(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    fill(db)
    text = subprocess.run([sys.executable, "-m", "policyplug", "report", "--db", str(db)], capture_output=True,
                          text=True, timeout=60)
    assert text.returncode == 0
    assert "Top denied rules" in text.stdout and "partner.example" in text.stdout
    csv_out = subprocess.run([sys.executable, "-m", "policyplug", "report", "--db", str(db), "--format", "csv"],
                             capture_output=True, text=True, timeout=60)
    assert "Top external domains,spam.example,4,4" in csv_out.stdout
    missing = subprocess.run([sys.executable, "-m", "policyplug", "report", "--db", str(tmp_path / "none.db")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "no usage store" in missing.stderr


def test_html_report_renders_its_charts_in_chromium(tmp_path: Path) -> None:
    chromium = require_binary("chromium", "chromium-browser", "/usr/bin/chromium")
    db = tmp_path / "usage.db"
    fill(db)
    page = tmp_path / "report.html"
    subprocess.run([sys.executable, "-m", "policyplug", "report", "--db", str(db), "--html", str(page)],
                   check=True, capture_output=True, timeout=60)
    html = page.read_text()
    for external in ("<script", "<link", "src=", "href=", "@import", "url("):  # self-contained: nothing fetched
        assert external not in html
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1000,2400",
                    "--hide-scrollbars", page.as_uri()], check=True, capture_output=True, timeout=120)
    counts = colour_counts(shot.read_bytes())
    for colour in COLOURS:
        rgb = tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
        assert counts[rgb] > 500, f"chart colour {colour} barely visible ({counts[rgb]} pixels)"
