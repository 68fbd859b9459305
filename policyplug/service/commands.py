"""`policyplug serve POLICY ...`: run the decision service until stopped."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from ..diagnostics import PolicyError

log = logging.getLogger("policyplug.service")


def default_socket_path() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return str(Path(runtime) / "policyplug.sock") if runtime else "policyplug.sock"


async def run(args: argparse.Namespace) -> int:
    from ..audit import AuditWriter
    from .metrics import Metrics
    from .server import DecisionService
    from .socket_transport import SocketPathError, SocketTransport

    audit = None
    if args.audit_log:
        try:
            audit = AuditWriter(
                args.audit_log,
                level=args.audit_level,
                include_bodies=args.audit_bodies,
                max_bytes=args.audit_max_bytes,
                seal_key=args.audit_seal_key,
                seal_interval=args.audit_seal_interval,
                syslog=args.audit_syslog,
                syslog_batches=args.audit_syslog_batches,
            )
        except ValueError as exc:
            print(f"policyplug serve: {exc}", file=sys.stderr)
            return 1
    elif args.audit_seal_key or args.audit_syslog:
        print("policyplug serve: --audit-seal-key and --audit-syslog need --audit-log", file=sys.stderr)
        return 1
    if args.audit_syslog and not args.audit_seal_key:
        print(
            "policyplug serve: --audit-syslog sends the heads of a sealed log: give --audit-seal-key too",
            file=sys.stderr,
        )
        return 1
    usage = None
    if args.usage_db:
        from ..usage.backends import open_usage_store

        try:
            usage = open_usage_store(args.usage_db)  # a SQLite file, or postgresql://... shared by every node
        except Exception as exc:  # psycopg's, sqlite3's or OSError: a clear message, not a traceback
            from ..usage.postgres_store import safe_url

            print(
                f"policyplug serve: --usage-db {safe_url(str(args.usage_db))}: {exc}".strip(), file=sys.stderr
            )
            return 1
    metrics = Metrics() if args.metrics_port is not None else None
    try:
        from ..state import make_limiter

        limiter = make_limiter(args.state, args.state_failure)
    except ValueError as exc:
        print(f"policyplug serve: {exc}", file=sys.stderr)
        return 2
    directory = None
    if args.directory_ldap:
        from ..directory_ldap import DirectoryConfigError, DirectorySource, LdapConfig

        try:
            directory = DirectorySource(LdapConfig.load(args.directory_ldap))
        except DirectoryConfigError as exc:
            print(f"policyplug serve: --directory-ldap {exc}", file=sys.stderr)
            return 2
        # the first snapshot is required: groups an ethical wall relies on must not be missing at start
        if not directory.refresh():
            print(
                f"policyplug serve: --directory-ldap {args.directory_ldap}: could not read the directory: "
                f"{directory.stats['last_error']}",
                file=sys.stderr,
            )
            return 1
    try:
        service = DecisionService(
            args.policy,
            audit=audit,
            usage=usage,
            metrics=metrics,
            freeze_gc=True,
            limiter=limiter,
            directory_source=directory,
            allowed_paths=args.allow_path,
        )
    except PolicyError as exc:
        print(exc.format(), file=sys.stderr)
        return 1
    if metrics is not None:
        if audit is not None:
            metrics.watch_audit(audit)
        if hasattr(limiter, "stats"):
            metrics.watch_state(limiter)
        if directory is not None:
            metrics.watch_directory(directory)
        metrics.serve(args.metrics_port, args.metrics_address)
        log.info("metrics on http://%s:%d/metrics", args.metrics_address, args.metrics_port)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP reloads off the event loop like every other reload (coalesced while one runs)
    hup_reloads: set[asyncio.Task[Any]] = set()

    def on_hup() -> None:
        task = loop.create_task(service.reload_async("SIGHUP"))
        hup_reloads.add(task)
        task.add_done_callback(hup_reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)

    transports = []
    if args.socket:
        socket_transport = SocketTransport(service, args.socket)
        try:
            await socket_transport.start()
        except SocketPathError as exc:
            print(f"policyplug serve: {exc}", file=sys.stderr)
            service.close()
            return 1
        transports.append(socket_transport)
    component = None
    if args.component:
        from .component import PolicyComponent

        host, _, port = args.server.rpartition(":")
        secret = args.secret or os.environ.get("POLICYPLUG_COMPONENT_SECRET", "")
        component = PolicyComponent(
            service,
            args.component,
            secret,
            host or "127.0.0.1",
            int(port),
            clients=args.component_client,
            admins=args.admin,
            metrics=metrics,
        )
        component.start()
    if directory is not None:
        directory.start(lambda: loop.call_soon_threadsafe(service.apply_directory))
    watcher = loop.create_task(service.watch(args.watch_interval)) if args.watch_interval > 0 else None
    print(
        f"policyplug serve: policy '{service.policy.name}' ({service.policy.revision[:19]}…)"
        + (f", socket {args.socket}" if args.socket else "")
        + (f", component {args.component} via {args.server}" if args.component else ""),
        flush=True,
    )
    await stop.wait()
    if watcher is not None:
        watcher.cancel()
    for transport in transports:
        await transport.close()
    if component is not None:
        await component.stop()
    service.close()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.socket and not args.component:
        args.socket = default_socket_path()
    return run_loop(run(args), args.event_loop)


def run_loop(main: Any, choice: str = "auto") -> int:
    """Run `main` on uvloop when asked or, with `auto`, when it is installed; asyncio otherwise."""
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise SystemExit(
                    "policyplug serve: --event-loop uvloop, but uvloop is not installed"
                ) from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the decision service (local socket and/or XMPP component)")
    p.add_argument("policy", metavar="POLICY")
    p.add_argument(
        "--socket",
        metavar="PATH",
        help="Unix socket to listen on (default: $XDG_RUNTIME_DIR/policyplug.sock)",
    )
    p.add_argument(
        "--component", metavar="JID", help="connect to an XMPP server as this component (XEP-0114)"
    )
    p.add_argument("--secret", help="component secret (or env POLICYPLUG_COMPONENT_SECRET)")
    p.add_argument(
        "--server", default="127.0.0.1:5347", metavar="HOST:PORT", help="the server's component port"
    )
    p.add_argument(
        "--component-client",
        action="append",
        default=[],
        metavar="JID",
        help="a JID besides the component's parent domain that may ask for decisions (repeatable)",
    )
    p.add_argument(
        "--admin",
        action="append",
        default=[],
        metavar="JID",
        help="a JID that may run the component's ad-hoc commands (repeatable; none: nobody)",
    )
    p.add_argument("--audit-log", metavar="PATH", help="hash-chained audit log (JSON Lines)")
    p.add_argument("--audit-level", choices=("denied", "all", "none"), default="denied")
    p.add_argument("--audit-bodies", action="store_true", help="keep message bodies in audit records")
    p.add_argument("--audit-max-bytes", type=int, default=None, help="rotate the audit log at this size")
    p.add_argument(
        "--audit-seal-key",
        metavar="DIR/seal.key",
        help="seal the audit log with this key (made by `policyplug audit keygen DIR`; docs/audit.md)",
    )
    p.add_argument(
        "--audit-seal-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds between seals, each advancing the key (default 60)",
    )
    p.add_argument(
        "--audit-syslog",
        metavar="TARGET",
        help="send each seal's chain head to syslog (RFC 5424): HOST:PORT (UDP), tcp://HOST:PORT or a "
        "Unix socket path",
    )
    p.add_argument(
        "--audit-syslog-batches",
        action="store_true",
        help="with --audit-syslog: also send the chain head after every batch of records (at most every "
        "5 ms), not only each seal's",
    )
    p.add_argument(
        "--usage-db",
        metavar="PATH",
        help="usage store for `policyplug report`: a SQLite file, or postgresql://... "
        "shared by every node (password: PGPASSWORD or ~/.pgpass)",
    )
    p.add_argument(
        "--state",
        metavar="URL",
        help="keep `limit` windows in Redis, shared by every process and node using it: "
        "redis://HOST:PORT/DB, rediss://, unix://PATH?db=N or "
        "redis+sentinel://HOST:PORT[,HOST:PORT]/SERVICE/DB (default: in this process)",
    )
    p.add_argument(
        "--state-failure",
        choices=("open", "closed"),
        default="closed",
        help="when Redis is unreachable, a `limit` counts as exceeded (closed, the default) or not (open)",
    )
    p.add_argument(
        "--directory-ldap",
        metavar="CONFIG.toml",
        help="users, groups and attributes from LDAP / Active Directory, overlaid on the policy's "
        "directory and refreshed on an interval and on reload (docs/scaling.md)",
    )
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    p.add_argument("--metrics-address", default="127.0.0.1", help="address for metrics (default loopback)")
    p.add_argument(
        "--watch-interval",
        type=float,
        default=1.0,
        help="seconds between checks for policy file changes (0: only SIGHUP reloads)",
    )
    p.add_argument(
        "--event-loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="auto: uvloop when installed (less time per read and write), else asyncio",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument(
        "--allow-path",
        action="append",
        default=[],
        metavar="DIR",
        help="let the policy's includes, list files and directory lie in DIR too (repeatable)",
    )
    p.set_defaults(func=cmd_serve)
