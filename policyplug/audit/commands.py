"""`policyplug audit verify LOG...`"""

from __future__ import annotations

import argparse
import sys

from .verify import verify


def cmd_verify(args: argparse.Namespace) -> int:
    result = verify(args.logs, allow_partial=args.partial)
    if result.problem:
        print(f"TAMPERED: {result.problem}", file=sys.stderr)
        print(f"{result.records} records verified before the problem", file=sys.stderr)
        return 1
    for name in result.files:
        print(f"  {name}")
    print(f"intact: {result.records} records in {len(result.files)} files")
    if result.truncated_tail:
        print(f"note: {result.truncated_tail}")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    audit = subparsers.add_parser("audit", help="audit log tools")
    sub = audit.add_subparsers(dest="audit_command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("verify", help="check the hash chain of audit logs (oldest file first)")
    p.add_argument("logs", nargs="+", metavar="LOG", help="log files, a base name with rotations, or a folder")
    p.add_argument("--partial", action="store_true",
                   help="accept a chain that starts in the middle (older rotated files deleted on purpose)")
    p.set_defaults(func=cmd_verify)
