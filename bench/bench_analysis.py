"""Analysis benchmark: `analyze` and `diff` of bench_engine's generated policies, `replay` throughput.

    PYTHONPATH=. python3 bench/bench_analysis.py [--rules 200 2000] [--diff-rules 200] [--events 1000000]

Prints, for each policy size, the wall and CPU time of analyze (with witnesses, every one decided
by the engine) and its findings; for the --diff-rules sizes, of diff against an identical copy
(proves "same") and against a copy with one threshold changed; then replay throughput on an
audit log of N recorded events (written by the real AuditWriter: 20,000 records, repeated to N
lines; replay reads records, it does not check the chain). Timings on a shared machine: judged
runs hold the benchmark lock (docs/benchmarks.md); compare within one run.
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


def _timed() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> str:
    return f"{time.perf_counter() - start[0]:.1f} s (CPU {time.process_time() - start[1]:.1f} s)"


def bench_analyze(n: int) -> None:
    policy = load_policy(text=make_policy(n))
    started = _timed()
    result = analyze(policy)
    kinds = Counter(f.kind for f in result.findings)
    print(
        f"{n} rules: analyze {_since(started)}  findings {len(result.findings)} {dict(kinds)}  "
        f"live witnesses {len(result.live)}",
        flush=True,
    )


def bench_diff(n: int) -> None:
    text = make_policy(n)
    policy = load_policy(text=text)
    started = _timed()
    same = diff(policy, load_policy(text=text))
    print(f"{n} rules: diff (identical) {_since(started)}  same={same.same}", flush=True)
    mutated = load_policy(text=text.replace("size > ", "size > 1", 1))
    started = _timed()
    changed = diff(policy, mutated)
    print(
        f"{n} rules: diff (one threshold changed) {_since(started)}  "
        f"changes={len(changed.changes)} unknown={len(changed.unknown)}",
        flush=True,
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
        for jobs in (1, None):
            started = _timed()
            result = replay(proposed, [str(log)], lambda line: print(f"  {line}", file=sys.stderr), jobs=jobs)
            elapsed = time.perf_counter() - started[0]
            cpu = time.process_time() - started[1]
            label = "1 process" if jobs == 1 else "default processes"
            print(
                f"replay ({label}): {result.events} events in {elapsed:.1f} s = "
                f"{result.events / elapsed:,.0f} events/s (CPU of this process {cpu:.1f} s), "
                f"{result.changed} changed, {len(result.never_hit)} rules never hit",
                flush=True,
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, nargs="*", default=[200], help="analyze these sizes")
    parser.add_argument("--diff-rules", type=int, nargs="*", default=[200], help="diff these sizes")
    parser.add_argument("--events", type=int, default=1_000_000, help="replay this many (0: none)")
    args = parser.parse_args()
    for n in args.rules:
        bench_analyze(n)
    for n in args.diff_rules:
        bench_diff(n)
    if args.events:
        bench_replay(args.events)
    return 0


if __name__ == "__main__":
    sys.exit(main())
