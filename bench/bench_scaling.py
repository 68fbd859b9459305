#!/usr/bin/env python3
"""What sharing state costs (docs/scaling.md), same run, same machine:

  - decisions/s of `policyplug serve` through its socket (pipelined, a window of requests in flight)
    for a policy whose deciding rule has a `limit`, with windows in the process and in Redis
    (`--state redis://`), and for a policy without `limit`, without and with `--state` (must be
    the same: such decisions never touch Redis);
  - the LDAP directory source: time and memory to read 50,000 users and 5,000 groups (each user in
    3 groups) from a real slapd, as `serve --directory-ldap` does at start and on every refresh.

Rows are interleaved (A B C D A B C D ...) and the best of --rounds is printed, so that the other jobs
on this shared machine hurt every row alike.

    python3 bench/bench_scaling.py [--requests 20000] [--rounds 3] [--users 50000] [--groups 5000]
                                   [--baseline /work/main] [--skip-ldap]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers.ldap import SERVICE_PASSWORD, SUFFIX, LdapServer  # noqa: E402
from tests.servers.redis import RedisServer  # noqa: E402

LIMITED = """policy "bench-limit"
local domains ["acme.example"]
default allow

rule flood:
  on message
  limit 1000000 per minute by sender.address
  deny "too many messages"
"""

PLAIN = """policy "bench-plain"
local domains ["acme.example"]
default allow

rule blocked:
  on message
  when recipient.domain == "evil.example"
  deny "blocked"
"""


def requests(count: int) -> list[bytes]:
    return [
        (
            f'{{"id":{i},"event":{{"kind":"message","from":"u{i % 500}@acme.example",'
            f'"to":"v{i % 97}@partner.example","body":"hello"}}}}\n'
        ).encode()
        for i in range(count)
    ]


def throughput(sock_path: Path, lines: list[bytes], window: int = 64) -> float:
    """Decisions/s with `window` requests in flight on one connection."""
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(sock_path))
        buffer = b""
        sent = answered = 0
        started = time.perf_counter()
        while answered < len(lines):
            while sent < len(lines) and sent - answered < window:
                client.sendall(lines[sent])
                sent += 1
            chunk = client.recv(1 << 16)
            if not chunk:
                raise ConnectionError("service closed the connection")
            buffer += chunk
            done = buffer.count(b"\n")
            answered += done
            buffer = buffer[buffer.rfind(b"\n") + 1 :]
        return len(lines) / (time.perf_counter() - started)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc): unlike wall time, not inflated by
    other jobs waiting for the same cores."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(
    workdir: Path, policy_text: str, *extra: str, code: Path = ROOT
) -> tuple[subprocess.Popen[bytes], Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    policy = workdir / "bench.policy"
    policy.write_text(policy_text)
    sock = workdir / "pp.sock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "policyplug",
            "serve",
            str(policy),
            "--socket",
            str(sock),
            "--watch-interval",
            "0",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONPATH=str(code)),
    )
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("service did not start")
        time.sleep(0.05)
    return proc, sock


def bench_decisions(tmp: Path, count: int, rounds: int, baseline: Path | None) -> None:
    redis = RedisServer(tmp / "redis")
    redis.start()
    rows: dict[str, tuple[str, tuple[str, ...], Path]] = {
        "limit rule, windows in process": (LIMITED, (), ROOT),
        "limit rule, windows in Redis (--state)": (LIMITED, ("--state", redis.url), ROOT),
        "no limit rule": (PLAIN, (), ROOT),
        "no limit rule, --state redis (unused)": (PLAIN, ("--state", redis.url), ROOT),
    }
    if baseline is not None:  # the same policy on the code before this work: must be the same
        rows[f"no limit rule, {baseline}"] = (PLAIN, (), baseline)
    services = {
        name: start(tmp / f"svc{i}", text, *extra, code=code)
        for i, (name, (text, extra, code)) in enumerate(rows.items())
    }
    lines = requests(count)
    rates: dict[str, list[float]] = {name: [] for name in rows}
    cpu: dict[str, list[float]] = {name: [] for name in rows}  # service CPU µs per decision
    redis_cpu: dict[str, float] = {name: 0.0 for name in rows}
    try:
        for _, sock in services.values():
            throughput(sock, lines[:2000])  # warm up: caches, Redis script load
        for _ in range(rounds):
            for name, (_, sock) in services.items():
                pid = services[name][0].pid
                before, redis_before = cpu_seconds(pid), cpu_seconds(redis.proc.pid)
                rates[name].append(throughput(sock, lines))
                cpu[name].append((cpu_seconds(pid) - before) / count * 1e6)
                redis_cpu[name] += (cpu_seconds(redis.proc.pid) - redis_before) / count * 1e6 / rounds
        calls = redis.client().info("commandstats")
    finally:
        for proc, _ in services.values():
            proc.terminate()
            proc.wait(timeout=30)
        redis.stop()
    print(
        f"through the socket, {count} requests, 64 in flight, {rounds} rounds: decisions/s (best, median), "
        "CPU µs per decision (service, median; Redis, mean)"
    )
    for name in rows:
        print(
            f"  {name:42s} {max(rates[name]):10,.0f} {statistics.median(rates[name]):10,.0f}"
            f" {statistics.median(cpu[name]):8.1f} {redis_cpu[name]:8.1f}"
        )
    evals = sum(int(v["calls"]) for k, v in calls.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))
    # the `--state` row with a limit rule made them all; the row without a limit rule added none
    print(f"  Redis script calls: {evals:,} (decisions with a limit on Redis: {rounds * count + 2000:,})")


def ldif(users: int, groups: int, per_user: int, rng: random.Random) -> str:
    out = []
    members: list[list[str]] = [[] for _ in range(groups)]
    for u in range(users):
        dn = f"uid=user{u},ou=people,{SUFFIX}"
        out.append(
            f"dn: {dn}\nobjectClass: inetOrgPerson\ncn: user{u}\nsn: user{u}\nuid: user{u}\n"
            f"mail: user{u}@acme.example\nemployeeType: level{u % 5}\ndepartmentNumber: {u % 40}\n"
        )
        for g in rng.sample(range(groups), per_user):
            members[g].append(dn)
    for g in range(groups):
        group_members = members[g] or [f"uid=user0,ou=people,{SUFFIX}"]
        out.append(
            f"dn: cn=group{g},ou=groups,{SUFFIX}\nobjectClass: groupOfNames\ncn: group{g}\n"
            + "".join(f"member: {m}\n" for m in group_members)
        )
    return "\n".join(out) + "\n"


def bench_ldap(tmp: Path, users: int, groups: int) -> None:
    from policyplug.directory_ldap import LdapConfig, LdapDirectory

    server = LdapServer(tmp / "slapd", memberof=False)
    started = time.perf_counter()
    server.bulk_load(ldif(users, groups, 3, random.Random(21)))
    slapadd = time.perf_counter() - started
    server.start()
    try:
        password = tmp / "ldap.password"
        password.write_text(SERVICE_PASSWORD)
        config_path = tmp / "ldap.toml"
        config_path.write_text(
            f'url = "{server.url}"\nbind_dn = "cn=policyplug,{SUFFIX}"\n'
            f'password_file = "{password}"\nusers_base = "ou=people,{SUFFIX}"\n'
            f'groups_base = "ou=groups,{SUFFIX}"\ntimeout = 120\n'
            '[attributes]\nlevel = "employeeType"\ndepartment = "departmentNumber"\n'
        )
        reader = LdapDirectory(LdapConfig.load(config_path))
        times = []
        for _ in range(2):
            started = time.perf_counter()
            snapshot, counts = reader.load()
            times.append(time.perf_counter() - started)
        del snapshot
        tracemalloc.start()
        snapshot, counts = reader.load()
        _, peak = tracemalloc.get_traced_memory()
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
    finally:
        server.stop()
    print(
        f"LDAP directory: {counts['users']:,} users, {counts['groups']:,} groups (3 per user), slapd on loopback"
    )
    print(f"  slapadd (setup only)                       {slapadd:8.1f} s")
    print(f"  read and build the snapshot                {min(times):8.2f} s (best of {len(times)})")
    print(f"  memory: snapshot held {held / 2**20:,.0f} MiB, peak while reading {peak / 2**20:,.0f} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--users", type=int, default=50000)
    parser.add_argument("--groups", type=int, default=5000)
    parser.add_argument("--skip-ldap", action="store_true")
    parser.add_argument(
        "--baseline", type=Path, help="another checkout (e.g. /work/main) for a row without limit"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="policyplug-bench-scaling-") as folder:
        tmp = Path(folder)
        bench_decisions(tmp, args.requests, args.rounds, args.baseline)
        if not args.skip_ldap:
            bench_ldap(tmp, args.users, args.groups)
    return 0


if __name__ == "__main__":
    sys.exit(main())
