"""`policyplug audit keygen DIR` and `policyplug audit verify [--key KEY] [--heads FILE] LOG...`"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .verify import ChainResult, verify


def cmd_keygen(args: argparse.Namespace) -> int:
    from .seal import KEY_FILE, keygen

    try:
        verification_key = keygen(args.dir)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(verification_key)
    print(
        f"sealing key written to {Path(args.dir) / KEY_FILE} (for the writer's host); keep the verification "
        "key above elsewhere: it verifies every seal, and anyone holding it can forge them",
        file=sys.stderr,
    )
    return 0


def _key(args: argparse.Namespace) -> bytes | None:
    from .seal import parse_verification_key

    if args.key is None:
        return None
    text = args.key
    if not text.startswith("ppseal") and Path(text).is_file():  # the key kept in a file
        from .files import open_regular

        with open(open_regular(Path(text)), "rb") as file:  # a FIFO or device refused, a big file cut
            text = file.read(4096).decode("utf-8", "replace")
    return parse_verification_key(text)


def _describe(chain: ChainResult, keyed: bool) -> list[str]:
    lines = [f"  {name}" for name in chain.files]
    lines += [f"  {repair}" for repair in chain.repairs]
    if keyed and chain.last_seal is not None:
        seal = chain.last_seal
        lines.append(
            f"  sealed up to {seal['time']} (seq {seal['seq']}, interval {seal['index']}, {seal['where']}); "
            f"{chain.seals} seals, intervals {chain.first_seal_index}–{seal['index']} without gap"
        )
        if chain.unsealed:
            first, last = chain.unsealed_span or ("?", "?")
            lines.append(
                f"  {chain.unsealed} records follow the last seal, not sealed yet (written {first} – {last})"
            )
        else:
            lines.append("  no record follows the last seal")
    if chain.heads_checked:
        lines.append(f"  {chain.heads_checked} chain heads held off the host match the log")
    return lines


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        key = _key(args)
        heads = None
        if args.heads is not None:
            from .syslog import read_heads

            heads = read_heads(args.heads)
            if not heads:
                print(f"error: no chain heads in {args.heads}", file=sys.stderr)
                return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    result = verify(args.logs, allow_partial=args.partial, key=key, heads=heads)
    if result.problem:
        print(f"TAMPERED: {result.problem}", file=sys.stderr)
        print(f"{result.records} records verified before the problem", file=sys.stderr)
        return 1
    several = len(result.chains) > 1
    for chain in result.chains:
        if several:
            print(f"chain {chain.name}: intact, {chain.records} records in {len(chain.files)} files")
        for line in _describe(chain, key is not None):
            print(line)
        if chain.truncated_tail:
            print(f"note: {chain.truncated_tail}")
    chains = f" ({len(result.chains)} chains)" if several else ""
    print(f"intact: {result.records} records in {len(result.files)} files{chains}")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    audit = subparsers.add_parser("audit", help="audit log tools")
    sub = audit.add_subparsers(dest="audit_command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("verify", help="check the hash chain (and with --key the seals) of audit logs")
    p.add_argument(
        "logs",
        nargs="+",
        metavar="LOG",
        help="log files (oldest first), a base name with rotations, or a folder (each chain on its own)",
    )
    p.add_argument(
        "--partial",
        action="store_true",
        help="accept a chain that starts in the middle (older rotated files deleted on purpose)",
    )
    p.add_argument(
        "--key",
        metavar="VERIFICATION_KEY",
        help="the verification key `audit keygen` printed (or a file holding it): check the seals",
    )
    p.add_argument(
        "--heads",
        metavar="FILE",
        help="chain heads a syslog collector received (serve --audit-syslog): compare the log with them",
    )
    p.set_defaults(func=cmd_verify)
    k = sub.add_parser("keygen", help="make a sealing key DIR/seal.key; print its verification key")
    k.add_argument("dir", metavar="DIR", help="folder for seal.key (on the writer's host)")
    k.set_defaults(func=cmd_keygen)
