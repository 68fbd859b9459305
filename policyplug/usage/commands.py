"""`policyplug report`: usage reports from the usage store."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .report import build_tables, render_csv, render_html, render_text


def cmd_report(args: argparse.Namespace) -> int:
    try:
        tables = build_tables(args.db, args.since, args.until, args.top)
    except (FileNotFoundError, OSError) as exc:
        print(f"policyplug report: {exc}", file=sys.stderr)
        return 1
    period = f"from {args.since or 'the beginning'} until {args.until or 'now'}"
    if args.html:
        Path(args.html).write_text(render_html(tables, period=period), encoding="utf-8")
        print(f"wrote {args.html}")
    if args.format == "csv":
        sys.stdout.write(render_csv(tables))
    elif not args.html or args.format == "text":
        print(f"policyplug usage report, {period}\n")
        sys.stdout.write(render_text(tables))
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help="usage reports from the usage store (SQLite)")
    p.add_argument("--db", required=True, help="the usage store written by `policyplug serve --usage-db`")
    p.add_argument("--since", help="start of the period (RFC 3339 or YYYY-MM-DD), inclusive")
    p.add_argument("--until", help="end of the period, exclusive")
    p.add_argument("--format", choices=("text", "csv"), default=None)
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page with charts")
    p.add_argument("--top", type=int, default=10, help="rows in the top-N tables")
    p.set_defaults(func=cmd_report)
