"""Usage reports: the tables a compliance officer asks for, as text, CSV or a self-contained HTML page.

Tables: traffic by direction and outcome; top external domains; top denied rules; busiest users;
traffic by tag (the rules' `tag "LABEL"`s).
The HTML page has inline SVG bar charts (no scripts, no fonts, no network) so it can be mailed
or archived as one file.
"""

from __future__ import annotations

import csv
import html
import io
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[tuple]


def _range(since: str | None, until: str | None) -> tuple[str, list[str]]:
    clauses, params = [], []
    if since:
        clauses.append("hour >= ?")
        params.append(since[:13] + ":00Z" if len(since) >= 13 else since)
    if until:
        clauses.append("hour < ?")
        params.append(until[:13] + ":00Z" if len(until) >= 13 else until)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


class UsageStoreError(OSError):
    """The usage store cannot be read (not a store, or damaged)."""


def open_read_only(db_path: str | Path) -> sqlite3.Connection:
    """Open an existing SQLite store read-only, whatever characters its path holds.

    The path goes into a `file:` URI percent-encoded (Path.as_uri): pasted in raw, `u#x.db` lost
    everything from `#` on (as a URI fragment, `?mode=ro` with it), so SQLite created and opened
    `u` read-write."""
    path = Path(db_path)
    if not path.is_file():
        raise FileNotFoundError(f"no usage store at {db_path}")
    try:
        return sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise UsageStoreError(f"cannot open the usage store {db_path}: {exc}") from None


def build_tables(
    db_path: str | Path, since: str | None = None, until: str | None = None, top: int = 10
) -> list[Table]:
    """The report's tables for hours in [since, until); `top` rows in the top-N tables."""
    db = open_read_only(db_path)
    where, params = _range(since, until)
    and_where = (where + " AND ") if where else " WHERE "
    try:
        by_direction = db.execute(
            f"SELECT direction, decision, SUM(count) FROM traffic{where} GROUP BY direction, decision "
            "ORDER BY direction, decision",
            params,
        ).fetchall()
        domains = db.execute(
            f"SELECT CASE WHEN direction = 'outbound' THEN recipient_domain ELSE sender_domain END AS domain, "
            f"SUM(count), SUM(CASE WHEN decision IN ('deny', 'drop') THEN count ELSE 0 END) FROM traffic"
            f"{and_where}direction IN ('outbound', 'inbound') GROUP BY domain ORDER BY 2 DESC, 1 LIMIT ?",
            [*params, top],
        ).fetchall()
        denied = db.execute(
            f"SELECT rule, decision, SUM(count) FROM traffic{and_where}decision IN ('deny', 'drop') "
            "GROUP BY rule, decision ORDER BY 3 DESC, 1 LIMIT ?",
            [*params, top],
        ).fetchall()
        users = db.execute(
            f"SELECT user, SUM(count), SUM(CASE WHEN direction != 'internal' THEN count ELSE 0 END) "
            f"FROM user_messages{where} GROUP BY user ORDER BY 2 DESC, 1 LIMIT ?",
            [*params, top],
        ).fetchall()
        # opened read-only, a store written before tags were counted has no tag_traffic: an empty table then
        has_tags = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'tag_traffic'"
        ).fetchone()
        # not limited by --top: tags are literals in the policy, so there are few of them
        tags = (
            db.execute(
                f"SELECT tag, direction, decision, SUM(count) FROM tag_traffic{where} GROUP BY tag, direction, decision "
                "ORDER BY tag, direction, decision",
                params,
            ).fetchall()
            if has_tags
            else []
        )
    except sqlite3.Error as exc:  # not a usage store (no tables), not a database, damaged
        raise UsageStoreError(f"{db_path} is not a readable usage store: {exc}") from None
    finally:
        db.close()
    return [
        Table("Traffic by direction and outcome", ["direction", "decision", "events"], by_direction),
        Table("Top external domains", ["domain", "events", "refused"], domains),
        Table("Top denied rules", ["rule", "decision", "events"], denied),
        Table("Busiest users (messages)", ["user", "messages", "external"], users),
        Table("Traffic by tag", ["tag", "direction", "decision", "events"], tags),
    ]


# Characters that change how a terminal, editor or browser shows the text around them: C0 and C1
# controls and DEL (ESC starts terminal escape sequences), and the bidirectional overrides and
# isolates (they reorder what is shown). Addresses come from remote senders (`%1b[31m` in a SIP
# user part is a raw ESC once decoded), so every report shows them escaped, as \x1b or \u202e.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape_control(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean(value: object) -> str:
    """A cell as shown in any format: its control characters escaped."""
    text = str(value)
    return _CONTROLS.sub(_escape_control, text) if _CONTROLS.search(text) else text


def csv_cell(value: object) -> object:
    """A CSV cell that no spreadsheet runs as a formula (OWASP's CSV-injection rule): a text cell
    starting with = + - @ tab or carriage return gets a leading apostrophe, which spreadsheets
    show as text. Counts (ints) stay numbers."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    text = clean(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def render_text(tables: list[Table]) -> str:
    out = []
    for table in tables:
        out.append(table.title)
        cells = [table.columns] + [[clean(c) for c in row] for row in table.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(table.columns))]
        for n, row in enumerate(cells):
            out.append(
                "  "
                + "  ".join(
                    c.rjust(w) if n and c.isdigit() else c.ljust(w) for c, w in zip(row, widths, strict=True)
                ).rstrip()
            )
            if n == 0:
                out.append("  " + "  ".join("-" * w for w in widths))
        if not table.rows:
            out.append("  (nothing in this period)")
        out.append("")
    return "\n".join(out)


def render_csv(tables: list[Table]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    for table in tables:
        writer.writerow(["table", *table.columns])
        for row in table.rows:
            writer.writerow([table.title, *(csv_cell(c) for c in row)])
    return buffer.getvalue()


COLOURS = ("#2b6cb0", "#c53030", "#2f855a", "#b7791f", "#6b46c1")  # one per table, in order


def _bar_chart(table: Table, colour: str) -> str:
    """Horizontal bars of the table's first numeric column, inline SVG."""
    if not table.rows:
        return "<p>(nothing in this period)</p>"
    value_index = next(i for i, c in enumerate(table.columns) if c in ("events", "messages"))
    labels = [" / ".join(clean(v) for v in row[:value_index]) for row in table.rows]
    values = [int(row[value_index]) for row in table.rows]
    peak = max(values) or 1
    height = 26 * len(values) + 10
    bars = []
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        width = max(2, int(520 * value / peak))
        y = 8 + 26 * i
        bars.append(
            f'<text x="0" y="{y + 15}" font-size="13">{html.escape(label)}</text>'
            f'<rect class="bar" x="230" y="{y}" width="{width}" height="20" fill="{colour}"/>'
            f'<text x="{236 + width}" y="{y + 15}" font-size="13">{value}</text>'
        )
    return (
        f'<svg class="chart" role="img" aria-label="{html.escape(table.title)}" width="820" height="{height}" '
        f'xmlns="http://www.w3.org/2000/svg" font-family="sans-serif">{"".join(bars)}</svg>'
    )


def render_html(tables: list[Table], title: str = "policyplug usage report", period: str = "") -> str:
    sections = []
    # colours repeat rather than zip() dropping the sections beyond the last colour
    for i, table in enumerate(tables):
        colour = COLOURS[i % len(COLOURS)]
        head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(clean(v))}</td>" for v in row) + "</tr>" for row in table.rows
        )
        sections.append(
            f"<section><h2>{html.escape(table.title)}</h2>{_bar_chart(table, colour)}"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></section>"
        )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:2em;color:#1a202c}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #cbd5e0;padding:4px 10px;text-align:left}th{background:#edf2f7}"
        "section{margin-bottom:2em}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(period)}</p>{''.join(sections)}</body></html>"
    )
