"""What the client's source address costs new connections (issue 15: at most 5 %), as a pair.

    .venv/bin/python bench/source_cost.py [--blocks 6] [--reps 4] [--out bench/source_cost.json]

bench/run.py's rounds measure ours-builtin (source_address client, the default) and
ours-builtin-loopback a whole forwarder's tests apart, once per round, and ab's rate through
the same forwarder moved from 17.9k to 27.9k req/s over the rounds of one run: a 5 % target
drowns in that (0.94× in one run, 1.05× and 1.02× in the two before). Here both are kept up
side by side (a container each, the same images and clients) and measured in blocks: `--reps`
repetitions of each test through one, then as many through the other, the order turned each
block, so a block's ratio (median ÷ median) compares figures seconds apart. The figure is the
median of the blocks' ratios, with their range. As root; measurement only, nothing is
asserted. Everything made is removed on exit. Its section of RESULTS.md sits after
container_cost.py's; bench/run.py keeps both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import clients  # noqa: E402
import forwarders  # noqa: E402
import run  # noqa: E402
from infra import CommandLog, root_session  # noqa: E402
from report import SOURCE_COST_BEGIN, SOURCE_COST_END, put_section  # noqa: E402

PAIR = ("ours-builtin", "ours-builtin-loopback")  # (source_address client, loopback)
TESTS = {"newconn_rps": "new connections, ab (20,000 requests, 50 concurrent)",
         "newconn_wrk_rps": "new connections, wrk (3 s, 50 connections, `Connection: close`)"}


def measure(test: str, port: int, work: Path, seconds: int) -> float | None:
    if test == "newconn_rps":
        res = clients.ab_close(port, 20000, run.CONCURRENCY, work / "ab.csv")
    else:
        res = clients.wrk(port, seconds, run.CONCURRENCY, close=True)
    return res.get("rps")


def blocks(instances: dict, work: Path, n_blocks: int, reps: int, seconds: int) -> dict:
    """{test: [{forwarder: [rates]} per block]}"""
    out: dict[str, list[dict[str, list[float]]]] = {t: [] for t in TESTS}
    for b in range(n_blocks):
        order = PAIR if b % 2 == 0 else PAIR[::-1]
        for test in TESTS:
            block: dict[str, list[float]] = {}
            for name in order:
                rates = [measure(test, instances[name].http_port, work, seconds) for _ in range(reps)]
                block[name] = [r for r in rates if r]
            out[test].append(block)
            ratio = _ratio(block)
            print(f"block {b + 1}/{n_blocks} {test}: " + ", ".join(
                f"{n} {statistics.median(block[n]):,.0f}" for n in order if block[n])
                + (f" → {ratio:.3f}" if ratio else ""), flush=True)
    return out


def _ratio(block: dict[str, list[float]]) -> float | None:
    client, loopback = (block.get(n) for n in PAIR)
    if not client or not loopback:
        return None
    return statistics.median(client) / statistics.median(loopback)


def render(results: dict) -> str:
    lines = ["| new connections | client req/s (median of all) | loopback req/s | client ÷ loopback, "
             "median of the blocks [range] | blocks ≥ 0.95 | target ≥ 0.95 |", "|---|---|---|---|---|---|"]
    for test, label in TESTS.items():
        got = results["blocks"].get(test, [])
        ratios = [r for r in (_ratio(b) for b in got) if r]
        if not ratios:
            lines.append(f"| {label} | — | — | no figure | — | — |")
            continue
        pooled = [statistics.median([r for b in got for r in b.get(n, [])]) for n in PAIR]
        med = statistics.median(ratios)
        lines.append(f"| {label} | {pooled[0]:,.0f} | {pooled[1]:,.0f} | **{med:.3f}** "
                     f"[{min(ratios):.3f}–{max(ratios):.3f}] | {sum(r >= 0.95 for r in ratios)}/{len(ratios)} "
                     f"| {'**met**' if med >= 0.95 else '**missed**'} |")
    return "\n".join(lines) + "\n"


def update_results_md(path: Path, results: dict, table: str) -> None:
    prose = (
        f"`bench/source_cost.py` on {results['date']}: ours-builtin with source_address `client` (the "
        "default: the service sees the client's address) and `loopback` (it sees the container's "
        f"gateway), both kept up, measured in {results['n_blocks']} blocks of {results['reps']} repetitions "
        "of each test through one and then the other, the order turned each block; a block's ratio "
        "is median ÷ median of figures seconds apart (in the rounds above, one figure a round, a "
        "forwarder apart).")
    put_section(path, SOURCE_COST_BEGIN, SOURCE_COST_END,
                "What the client's address costs new connections (issue 15)", prose, table, results)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "source_cost.json")
    ap.add_argument("--results-md", default=str(HERE / "RESULTS.md"), help="the section goes there (empty: nowhere)")
    ap.add_argument("--render", action="store_true", help="measure nothing: write the section again from --out")
    args = ap.parse_args()
    if args.render:
        results = json.loads(args.out.read_text())
    else:
        if args.blocks < 1 or args.reps < 1:
            print("source_cost: --blocks and --reps must be at least 1", file=sys.stderr)
            return 2
        session = root_session("source_cost", "oci-portfwd-source-cost-")
        if session is None:
            return 2
        cleanup, work = session
        results = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "n_blocks": args.blocks, "reps": args.reps,
                   "seconds": args.seconds, "load_before": os.getloadavg()}
        try:
            env = run.prepare(work, cleanup, CommandLog(), run.REPO / ".venv/bin/oci-portfwd-hook",
                              rootlesskit=False)
            instances = {}
            try:
                for name in PAIR:
                    instances[name] = forwarders.FORWARDERS[name](env)
                time.sleep(0.5)
                results["blocks"] = blocks(instances, work, args.blocks, args.reps, args.seconds)
            finally:
                for inst in instances.values():
                    inst.teardown()
        except KeyboardInterrupt:
            return 130
        finally:
            cleanup.run_all()
        results["load_after"] = os.getloadavg()
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    table = render(results)
    print(table, end="")
    if args.results_md:
        update_results_md(Path(args.results_md), results, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
