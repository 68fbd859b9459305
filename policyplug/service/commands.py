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
        audit = AuditWriter(args.audit_log, level=args.audit_level, include_bodies=args.audit_bodies,
                            max_bytes=args.audit_max_bytes)
    usage = None
    if args.usage_db:
        from ..usage.store import UsageStore
        usage = UsageStore(args.usage_db)
    metrics = Metrics() if args.metrics_port is not None else None
    try:
        service = DecisionService(args.policy, audit=audit, usage=usage, metrics=metrics, freeze_gc=True,
                                  allowed_paths=args.allow_path)
    except PolicyError as exc:
        print(exc.format(), file=sys.stderr)
        return 1
    if metrics is not None:
        if audit is not None:
            metrics.watch_audit(audit)
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
        component = PolicyComponent(service, args.component, secret, host or "127.0.0.1", int(port))
        component.connect(host or "127.0.0.1", int(port))
    watcher = loop.create_task(service.watch(args.watch_interval)) if args.watch_interval > 0 else None
    print(f"policyplug serve: policy '{service.policy.name}' ({service.policy.revision[:19]}…)"
          + (f", socket {args.socket}" if args.socket else "")
          + (f", component {args.component} via {args.server}" if args.component else ""), flush=True)
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
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
                raise SystemExit("policyplug serve: --event-loop uvloop, but uvloop is not installed") from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the decision service (local socket and/or XMPP component)")
    p.add_argument("policy", metavar="POLICY")
    p.add_argument("--socket", metavar="PATH", help="Unix socket to listen on (default: $XDG_RUNTIME_DIR/policyplug.sock)")
    p.add_argument("--component", metavar="JID", help="connect to an XMPP server as this component (XEP-0114)")
    p.add_argument("--secret", help="component secret (or env POLICYPLUG_COMPONENT_SECRET)")
    p.add_argument("--server", default="127.0.0.1:5347", metavar="HOST:PORT", help="the server's component port")
    p.add_argument("--audit-log", metavar="PATH", help="hash-chained audit log (JSON Lines)")
    p.add_argument("--audit-level", choices=("denied", "all", "none"), default="denied")
    p.add_argument("--audit-bodies", action="store_true", help="keep message bodies in audit records")
    p.add_argument("--audit-max-bytes", type=int, default=None, help="rotate the audit log at this size")
    p.add_argument("--usage-db", metavar="PATH", help="SQLite usage store for `policyplug report`")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    p.add_argument("--metrics-address", default="127.0.0.1", help="address for metrics (default loopback)")
    p.add_argument("--watch-interval", type=float, default=1.0,
                   help="seconds between checks for policy file changes (0: only SIGHUP reloads)")
    p.add_argument("--event-loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                   help="auto: uvloop when installed (less time per read and write), else asyncio")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--allow-path", action="append", default=[], metavar="DIR",
                   help="let the policy's includes, list files and directory lie in DIR too (repeatable)")
    p.set_defaults(func=cmd_serve)
