"""One forwarder, kept up, measured again and again: for trying a change to the data path in
a minute instead of a `make bench` (same servers, clients and CPU meter as bench/run.py).

    .venv/bin/python bench/probe.py [--forwarder ours-builtin] [--reps 3]
                                    [--tests newconn,wrkclose,keepalive,keepalive2,c1000,tcp-up,tcp-down,udp]
                                    [--perf TEST] [--perf-out perf.data]

Prints one line per test and repetition: rate, p99, the forwarder's CPU (% of one core,
all its processes) and its CPU per request. `--perf TEST`: `perf record -g` (cpu-clock) of
every CPU during the last repetition of that test. A single instance and no interleaving:
figures move by ±15 % from one run to the next on a shared 2-CPU VM; compare medians of
several repetitions, and make bench's interleaved rounds for what goes in RESULTS.md.
Needs root, like bench/run.py; everything made is undone on exit.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import clients  # noqa: E402
import forwarders  # noqa: E402
import run  # noqa: E402
from infra import CommandLog, root_session  # noqa: E402

TESTS = ("newconn", "wrkclose", "keepalive", "keepalive2", "c1000", "tcp-up", "tcp-down", "udp")


def one(test: str, inst, work: Path, seconds: int) -> tuple[str, float | None]:
    """(a line to print, the rate)."""
    with clients.CpuMeter(inst.procs) as cpu:
        if test == "newconn":
            res = clients.ab_close(inst.http_port, 20000, run.CONCURRENCY, work / "ab.csv")
        elif test in ("wrkclose", "keepalive", "keepalive2", "c1000"):
            conns = {"c1000": 1000, "keepalive2": 2}.get(test, run.CONCURRENCY)
            res = clients.wrk(inst.http_port, seconds, conns, close=test == "wrkclose")
        elif test == "udp":
            res = clients.iperf_udp(inst.iperf_port, seconds)
        else:
            res = clients.iperf_tcp(inst.iperf_port, seconds, test == "tcp-down")
    rate = res.get("rps") or res.get("gbps") or res.get("mbps")
    unit = {"tcp": "Gbit/s", "udp": "Mbit/s"}.get(test[:3], "req/s")
    line = f"{test:9} {rate or 0:>10,.1f} {unit}"
    if res.get("loss_pct") is not None:
        line += f"  loss {res['loss_pct']:.1f} %"
    if res.get("p50_ms") is not None:
        line += f"  p50 {res['p50_ms']:.2f}  p90 {res['p90_ms']:.2f}"
    if res.get("p99_ms") is not None:
        line += f"  p99 {res['p99_ms']:.2f} ms"
    if cpu.percent is not None:
        line += f"  cpu {cpu.percent:.0f} %"
        if rate and unit == "req/s":
            line += f"  {cpu.percent / 100 * 1e6 / rate:.1f} µs/req"
    if res.get("error"):
        line += f"  error: {res['error']}"
    return line, rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--forwarder", default="ours-builtin", choices=list(forwarders.FORWARDERS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--tests", default="newconn,wrkclose")
    ap.add_argument("--perf", choices=TESTS)
    ap.add_argument("--perf-out", type=Path, default=Path("perf.data"))
    args = ap.parse_args()
    tests = [t for t in args.tests.split(",") if t]
    unknown = [t for t in tests if t not in TESTS]
    if unknown:
        print(f"probe: unknown tests {unknown}; known: {list(TESTS)}", file=sys.stderr)
        return 2
    session = root_session("probe", "oci-portfwd-probe-")
    if session is None:
        return 2
    cleanup, work = session
    name = args.forwarder
    try:
        env = run.prepare(work, cleanup, CommandLog(), run.REPO / ".venv/bin/oci-portfwd-hook",
                          rootlesskit=name.startswith("rootlesskit"), rootless_crun=name == "ours-rootless")
        inst = forwarders.FORWARDERS[name](env)
        try:
            time.sleep(0.5)
            rates: dict[str, list[float]] = {t: [] for t in tests}
            for rep in range(args.reps):
                for test in tests:
                    perf = None
                    if test == args.perf and rep == args.reps - 1:
                        perf = subprocess.Popen(
                            ["perf", "record", "-e", "cpu-clock", "-g", "-a", "-o", str(args.perf_out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                        time.sleep(0.3)
                    if test == "keepalive2":
                        run.settle()  # as make bench does: not in the wake of a busier test
                    try:
                        line, rate = one(test, inst, work, args.seconds)
                    finally:
                        if perf is not None:
                            perf.send_signal(signal.SIGINT)
                            perf.wait()
                    if rate:
                        rates[test].append(rate)
                    print(line, flush=True)
            for test, got in rates.items():
                if got:
                    print(f"median {test:9} {sorted(got)[len(got) // 2]:,.1f}")
        finally:
            inst.teardown()
    except KeyboardInterrupt:
        return 130
    finally:
        cleanup.run_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
