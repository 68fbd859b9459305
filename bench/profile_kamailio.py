#!/usr/bin/env python3
"""Where a Kamailio worker's time goes per MESSAGE, in-process (no Kamailio): the adapter's Python
path of a request (bench/bench_kamailio.py's MESSAGE, the 200-rule policy, a record per message)
timed per stage in a loop, and the timer process's chaining of those records.

KSR is a stand-in answering what the adapter asks (the C work behind each call in Kamailio is not
counted), so this splits the Python side only, warm: inside Kamailio the same code costs several
times more (docs/benchmarks.md, Kamailio); Kamailio's figures are bench_kamailio.py's. The timer
process's chaining runs every 500 requests here (about 100 ms at the benchmark's rate).

    python3 bench/profile_kamailio.py [--messages 20000] [--cprofile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def fake_ksr(values: dict[str, str]) -> types.ModuleType:
    ksr = types.ModuleType("KSR")

    def ns(**functions: object) -> types.SimpleNamespace:
        return types.SimpleNamespace(**functions)

    one = lambda *a: 1  # noqa: E731
    ksr.pv = ns(get=values.get)
    ksr.maxfwd = ns(process_maxfwd=one)
    ksr.sanity = ns(sanity_check_defaults=one)
    ksr.tmx = ns(t_precheck_trans=lambda: -1)
    ksr.tm = ns(t_check_trans=lambda: -1, t_relay=one, t_newtran=one, t_reply=one, t_release=one)
    ksr.siputils = ns(has_totag=lambda: -1)
    ksr.isdsturiset = lambda: False
    ksr.setdsturi = one
    ksr.is_myself_ruri = lambda: False
    ksr.hdr = ns(append_to_reply=one, remove=one)
    ksr.sl = ns(sl_send_reply=one, sl_reply_error=one)
    ksr.htable = ns(sht_get=lambda *a: None)
    for level in ("info", "warn", "err", "dbg", "notice", "crit"):
        setattr(ksr, level, lambda text: None)
    return ksr


def message(n: int) -> str:
    body = f"benchmark message {n}"
    return (
        "MESSAGE sip:bob@bench.example SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-{n}\r\n"
        f"From: <sip:alice@acme.example>;tag=123b{n}\r\n"
        "To: <sip:bob@bench.example>\r\n"
        f"Call-ID: {n}-123@127.0.0.1\r\n"
        "CSeq: 1 MESSAGE\r\nMax-Forwards: 70\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--audit", default="denied")
    args = parser.parse_args()
    from bench_kamailio import large_policy

    tmp = Path(tempfile.mkdtemp(prefix="policyplug-profile-kamailio-"))
    (tmp / "bench.policy").write_text(large_policy())
    (tmp / "kamailio.toml").write_text(
        f'policy = "{tmp / "bench.policy"}"\naudit_log = "{tmp / "audit.log"}"\n'
        f'audit_level = "{args.audit}"\nstate_dir = "{tmp / "state"}"\nnode = "bench"\n'
        'routes = { "bench.example" = "sip:127.0.0.1:5999" }\n'
    )
    os.environ["POLICYPLUG_KAMAILIO_CONFIG"] = str(tmp / "kamailio.toml")
    values = {
        "$fu": "sip:alice@acme.example",
        "$ru": "sip:bob@bench.example",
        "$sas": "udp:127.0.0.1:5070",
        "$rd": "bench.example",
    }
    sys.modules["KSR"] = fake_ksr(values)
    sys.path.insert(0, str(ROOT / "adapters" / "kamailio"))
    import policyplug_kemi as kemi

    handler = kemi.mod_init()
    adapter = handler.adapter
    raws = [message(n) for n in range(args.messages)]

    chained = [0.0]

    def requests() -> float:
        """The requests' CPU; the timer's chaining every 500 (about 100 ms at this rate) apart, in `chained`."""
        spent = 0.0
        for start in range(0, len(raws), 500):
            started = time.process_time()
            for raw in raws[start : start + 500]:
                values["$mb"] = raw
                adapter.request_route()
            middle = time.process_time()
            adapter.sync_audit()
            spent += middle - started
            chained[0] += time.process_time() - middle
        return spent

    requests()  # warm
    adapter.sync_audit()
    if args.cprofile:
        profile = cProfile.Profile()
        profile.enable()
        requests()
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
        adapter.sync_audit()
        return 0
    chained[0] = 0.0
    worker = requests()
    chaining = chained[0]
    # the same requests without the record (audit level none, the policy's clause aside)
    spool = adapter.audit
    adapter._records = False
    bare = requests()
    adapter._records = True
    n = args.messages
    # stage by stage, for one message's parts
    from policyplug.audit.record import encode_event

    values["$mb"] = raws[0]
    event_holder: dict[str, object] = {}
    real_record = adapter.record

    def keep(event: object, decision: object) -> bool:
        event_holder["e"], event_holder["d"] = event, decision
        return real_record(event, decision)

    adapter.record = keep  # type: ignore[method-assign]
    adapter.request_route()
    adapter.record = real_record  # type: ignore[method-assign]
    event = event_holder["e"]
    decision = adapter._decide(event)  # fresh: the request's own was read (copy_to) after its record

    def per(fn, count: int = n) -> float:
        started = time.process_time()
        for _ in range(count):
            fn()
        return (time.process_time() - started) / count * 1e6

    encoder = spool.encoder
    line = encoder.line(event, decision)
    print(f"{n} MESSAGEs, 200-rule policy, in a loop (process CPU µs per message):")
    print(f"  request path with the record:    {worker / n * 1e6:6.2f}")
    print(f"  request path without it:         {bare / n * 1e6:6.2f}")
    print(f"  chaining (timer process):        {chaining / n * 1e6:6.2f}")
    print(f"  record: submit (line + store):   {per(lambda: spool.submit(event, decision)):6.2f}")
    adapter.sync_audit()
    print(f"    encoder.line:                  {per(lambda: encoder.line(event, decision)):6.2f}")
    print(f"      encode_event:                {per(lambda: encode_event(event, False)):6.2f}")
    print(f"    store into the ring:           {per(lambda: spool._store(line)):6.2f}")
    adapter.sync_audit()
    print(f"  decide:                          {per(lambda: adapter._decide(event)):6.2f}")
    print(f"      decision.shape():            {per(decision.shape):6.2f}")
    print(f"      decision_parts:              {per(lambda: encoder.decision_parts(decision)):6.2f}")
    print(f"      draw_id:                     {per(encoder.draw_id):6.2f}")
    from datetime import UTC, datetime

    import orjson

    print(f"      orjson.dumps(datetime.now):  {per(lambda: orjson.dumps(datetime.now(UTC))):6.2f}")
    print(f"  record line {len(line)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
