"""Analysis benchmark: `analyze` and `diff` of bench_engine's generated policies, `replay` throughput.

    PYTHONPATH=. python3 bench/bench_analysis.py [--rules 200 2000] [--events 1000000]

Prints, for each policy size, the wall time of analyze (with witnesses, every one decided by the
engine), of diff against an identical copy (proves "same") and against a copy with one threshold
changed, and the findings; then replay throughput on an audit log of N recorded events (written
by the real AuditWriter: 20,000 records, repeated to N lines; replay reads records, it does not
check the chain). Timings are wall-clock on a shared machine: compare within one run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import make_events, make_policy  # noqa: E402

from policyplug.analysis.analyze import analyze  # noqa: E402
from policyplug.analysis.diff import diff  # noqa: E402
from policyplug.analysis.replay import replay  # noqa: E402
from policyplug.audit.log import AuditWriter  # noqa: E402
from policyplug.compiler import load_policy  # noqa: E402
from policyplug.events import Event  # noqa: E402


def bench_policy(n: int) -> None:
    text = make_policy(n)
    policy = load_policy(text=text)
    started = time.perf_counter()
    result = analyze(policy)
    analyzed = time.perf_counter() - started
    kinds = Counter(f.kind for f in result.findings)
    print(f"{n} rules: analyze {analyzed:.1f} s  findings {dict(kinds)}  live witnesses {len(result.live)}")
    started = time.perf_counter()
    same = diff(policy, load_policy(text=text))
    print(f"{n} rules: diff (identical) {time.perf_counter() - started:.1f} s  same={same.same}")
    mutated = load_policy(text=text.replace("size > ", "size > 1", 1))
    started = time.perf_counter()
    changed = diff(policy, mutated)
    print(
        f"{n} rules: diff (one threshold changed) {time.perf_counter() - started:.1f} s  "
        f"changes={len(changed.changes)} unknown={len(changed.unknown)}"
    )


def bench_replay(count: int) -> None:
    policy = load_policy(text=make_policy(200))
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "audit.jsonl"
        writer = AuditWriter(log, level="all", include_bodies=True, node="bench", background=False)
        for data in make_events(200, 20_000):
            event = Event.from_json(data)
            writer.submit(event, policy.decide(event))
        writer.close()
        lines = log.read_bytes().splitlines(keepends=True)
        with log.open("ab") as out:
            written = len(lines)
            while written < count:
                chunk = lines[: count - written]
                out.write(b"".join(chunk))
                written += len(chunk)
        proposed = load_policy(text=make_policy(200).replace("size > ", "size > 1", 1))
        started = time.perf_counter()
        result = replay(proposed, [str(log)], lambda line: print(f"  {line}", file=sys.stderr))
        elapsed = time.perf_counter() - started
        print(
            f"replay: {result.events} events in {elapsed:.1f} s = {result.events / elapsed:,.0f} events/s, "
            f"{result.changed} changed, {len(result.never_hit)} rules never hit"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, nargs="*", default=[200])
    parser.add_argument("--events", type=int, default=1_000_000)
    args = parser.parse_args()
    for n in args.rules:
        bench_policy(n)
    if args.events:
        bench_replay(args.events)
    return 0


if __name__ == "__main__":
    sys.exit(main())
