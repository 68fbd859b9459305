#!/usr/bin/env python3
"""Policy load time (parse + check + compile) against policy size: is loading linear?

Each row loads a policy of size N and of size N/2 (and N/4) and prints the seconds and the ratio of
the largest to the half size: about 2 for linear loading, about 4 for quadratic.

    python3 bench/bench_load.py [--repeat 3]

Rows: rules (10,000 rules, one condition each); a condition of 10,000 terms (a list literal, and
`||` of 10,000 comparisons); a constant sum `1+1+...` (the constant folder); a "diamond" of
includes (each file including the next twice, 17 deep: 2**17 paths, 18 files). A chain of binary
operators nests one level per term, and conditions nesting deeper than the CEL parser allows are
refused with "CEL expression nests too deep" (the row says so and times the refusal).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from policyplug import PolicyError, load_policy  # noqa: E402

HEAD = 'policy "bench"\ndefault allow\n'


def rules(n: int) -> str:
    return HEAD + "".join(f'rule r{i}:\n  when sender.domain == "d{i}.example"\n  deny\n' for i in range(n))


def list_terms(n: int) -> str:
    items = ",".join(str(i) for i in range(n))  # short terms: a condition may be 64 KiB long
    return HEAD + f"rule r:\n  when size in [{items}]\n  deny\n"


def or_terms(n: int) -> str:
    return HEAD + "rule r:\n  when " + " || ".join(f'sender.user == "u{i}"' for i in range(n)) + "\n  deny\n"


def sum_terms(n: int) -> str:
    return HEAD + "rule r:\n  when " + "+".join(["1"] * n) + f" == {n}\n  deny\n"


def timed(load: Callable[[], object], repeat: int) -> tuple[float, str]:
    times, outcome = [], "ok"
    for _ in range(repeat):
        started = time.perf_counter()
        try:
            load()
        except PolicyError as exc:
            outcome = exc.diagnostics[0].message
        times.append(time.perf_counter() - started)
    return statistics.median(times), outcome


def diamond(folder: Path, depth: int) -> Path:
    for i in range(depth):
        (folder / f"inc{i}.rules").write_text(
            f'rule r{i}:\n  when sender.user == "u{i}"\n  deny\n'
            f'include "inc{i + 1}.rules"\ninclude "inc{i + 1}.rules"\n'
        )
    (folder / f"inc{depth}.rules").write_text("rule leaf:\n  allow\n")
    (folder / "p.policy").write_text(HEAD + 'include "inc0.rules"\ninclude "inc0.rules"\n')
    return folder / "p.policy"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = [
        ("rules", rules, (2_500, 5_000, 10_000)),
        ("list literal terms", list_terms, (2_500, 5_000, 10_000)),
        ("|| terms", or_terms, (250, 500, 1_000)),
        ("|| terms (refused: too deep)", or_terms, (1_250, 2_500)),
        ("1+1+... terms", sum_terms, (150, 300, 600)),
        ("1+1+... terms (refused: too deep)", sum_terms, (2_500, 5_000, 10_000)),
    ]
    print(f"{'row':36} {'N':>7} {'seconds':>9}  {'N/2 -> N':>8}  outcome")
    for name, make, sizes in rows:
        results = []
        for n in sizes:
            text = make(n)
            seconds, outcome = timed(lambda text=text: load_policy(text=text), args.repeat)
            results.append(seconds)
            ratio = f"x{seconds / results[-2]:.1f}" if len(results) > 1 else ""
            print(f"{name:36} {n:>7,} {seconds:>9.3f}  {ratio:>8}  {outcome[:50]}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        for depth in (8, 17):
            path = diamond(Path(folder), depth)
            seconds, outcome = timed(lambda path=path: load_policy(path), args.repeat)
            print(
                f"{'diamond includes, depth':36} {depth:>7} {seconds:>9.3f}  {'':>8}  {outcome}", flush=True
            )


if __name__ == "__main__":
    main()
