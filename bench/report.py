"""bench/RESULTS.md from the raw results (results.json has the same data, every round), and
its summary table, which `make bench` also writes into README.md between the SUMMARY markers.

    .venv/bin/python bench/report.py [bench/results.json]   # re-render both, nothing measured
"""

import json
import os
import re
import shlex
import statistics
import sys
import textwrap
from pathlib import Path

import clients
from forwarders import FORWARDERS, LABELS

REF, BASE = "rootlesskit-builtin", "loopback"
OURS = "ours-builtin"
OURS_LOOPBACK = "ours-builtin-loopback"  # the same with source_address loopback
OURS_ROOTLESS = "ours-rootless"  # ours-builtin with crun (and so the hook) run by an unprivileged user

# key, column title, format, higher is better
FIGURES = {
    "tcp_up_gbps": ("TCP host→ctr Gbit/s", "{:.2f}", True),
    "tcp_down_gbps": ("TCP ctr→host Gbit/s", "{:.2f}", True),
    "tcp_up_after_1k_gbps": ("TCP host→ctr after 1k conns Gbit/s", "{:.2f}", True),
    "udp_mbps": ("UDP Mbit/s (of 1000 sent)", "{:.0f}", True),
    "udp_loss_pct": ("UDP loss %", "{:.1f}", False),
    "newconn_rps": ("new conn req/s (ab)", "{:,.0f}", True),
    "newconn_p99_ms": ("new conn p99 ms (ab)", "{:.2f}", False),
    "newconn_wrk_rps": ("new conn req/s (wrk)", "{:,.0f}", True),
    "newconn_wrk_p99_ms": ("new conn p99 ms (wrk)", "{:.2f}", False),
    "keepalive_rps": ("keep-alive req/s (wrk)", "{:,.0f}", True),
    "keepalive_p99_ms": ("keep-alive p99 ms (wrk)", "{:.2f}", False),
    "split_req_ms": ("request in two writes, median ms", "{:.2f}", False),
    "split_req_p99_ms": ("request in two writes, p99 ms", "{:.2f}", False),
    "keepalive_c2_rps": ("keep-alive req/s, 2 conns", "{:,.0f}", True),
    "keepalive_c2_p99_ms": ("keep-alive p99 ms, 2 conns", "{:.3f}", False),
    "keepalive_c1000_rps": ("keep-alive req/s, 1,000 conns", "{:,.0f}", True),
    "keepalive_c1000_p99_ms": ("keep-alive p99 ms, 1,000 conns", "{:.2f}", False),
    "keepalive_c1000_served": ("connections served of 1,000 (req/s × mean latency)", "{:,.0f}", True),
    "cpu_us_ka_c2": ("CPU µs/req keep-alive, 2 conns", "{:.1f}", False),
    "cpu_us_ka_c50": ("CPU µs/req keep-alive, 50 conns", "{:.1f}", False),
    "cpu_us_ka_c1000": ("CPU µs/req keep-alive, 1,000 conns", "{:.1f}", False),
    "cpu_us_newconn_wrk": ("CPU µs/req new conn (wrk)", "{:.1f}", False),
    "rss_idle_mb": ("RSS idle MB", "{:.1f}", False),
    "rss_1k_mb": ("RSS 1k conns MB", "{:.1f}", False),
    "pss_idle_mb": ("PSS idle MB", "{:.1f}", False),
    "pss_1k_mb": ("PSS 1k conns MB", "{:.1f}", False),
    "core_rss_idle_mb": ("core RSS idle MB", "{:.1f}", False),
    "core_rss_1k_mb": ("core RSS 1k conns MB", "{:.1f}", False),
}
CPU = {"cpu_tcp_up": "TCP host→ctr", "cpu_tcp_down": "TCP ctr→host",
       "cpu_tcp_up_after_1k": "TCP host→ctr after 1k conns", "cpu_udp": "UDP",
       "cpu_newconn": "new conn (ab)", "cpu_newconn_wrk": "new conn (wrk)",
       "cpu_keepalive": "keep-alive", "cpu_keepalive_c2": "keep-alive, 2 conns",
       "cpu_keepalive_c1000": "keep-alive, 1,000 conns"}
TABLES = [
    ("Throughput (iperf3)", ["tcp_up_gbps", "tcp_down_gbps", "udp_mbps", "udp_loss_pct",
                             "tcp_up_after_1k_gbps"]),
    ("HTTP (bench-httpd, 50 concurrent)", ["newconn_rps", "newconn_p99_ms", "newconn_wrk_rps",
                                          "newconn_wrk_p99_ms", "keepalive_rps", "keepalive_p99_ms",
                                          "split_req_ms", "split_req_p99_ms"]),
    ("Scale: keep-alive with 2, 50 and 1,000 connections (wrk), and the forwarder's CPU per request "
     "(its CPU share during the test over the rate, all its processes)",
     ["keepalive_c2_rps", "keepalive_c2_p99_ms", "keepalive_rps", "keepalive_c1000_rps",
      "keepalive_c1000_p99_ms", "keepalive_c1000_served", "cpu_us_ka_c2", "cpu_us_ka_c50", "cpu_us_ka_c1000", "cpu_us_newconn_wrk"]),
    ("Memory (sum over the forwarder's processes, idle and with 1,000 connections held open)",
     ["rss_idle_mb", "rss_1k_mb", "pss_idle_mb", "pss_1k_mb", "core_rss_idle_mb", "core_rss_1k_mb"]),
]
# The summary: ours against the best peer of each figure. Peers are the other forwarders; ours
# with the other drivers and direct loopback (the ceiling) are not.
PEERS = {"rootlesskit-builtin": "rootlesskit builtin", "rootlesskit-slirp4netns": "rootlesskit slirp4netns",
         "pasta": "pasta", "slirp4netns": "slirp4netns", "socat": "socat"}
SUMMARY_ROWS = [
    ("tcp_up_gbps", "TCP host→container, Gbit/s"),
    ("tcp_down_gbps", "TCP container→host, Gbit/s"),
    ("tcp_up_after_1k_gbps", "TCP host→container after 1,000 connections, Gbit/s"),
    ("udp_mbps", "UDP, Mbit/s received of 1,000 sent"),
    ("newconn_rps", "new connection per request (ab, 50 concurrent), req/s"),
    ("newconn_p99_ms", "p99 of those, ms"),
    ("newconn_wrk_rps", "new connection per request (wrk), req/s"),
    ("keepalive_rps", "keep-alive requests (wrk), req/s"),
    ("keepalive_p99_ms", "p99 of those, ms"),
    ("split_req_ms", "a keep-alive request written in two parts, median ms"),
    ("keepalive_c2_rps", "keep-alive requests, 2 connections, req/s"),
    ("keepalive_c1000_rps", "keep-alive requests, 1,000 connections, req/s"),
    ("cpu_us_ka_c50", "forwarder CPU per keep-alive request (50 connections), µs"),
    ("cpu_us_newconn_wrk", "forwarder CPU per new-connection request (wrk), µs"),
    ("pss_idle_mb", "memory idle, PSS of all its processes, MB"),
    ("pss_1k_mb", "memory with 1,000 connections open, PSS, MB"),
]
# Within this factor ours and the best peer are "even": the noise of a shared 2-core machine.
EVEN = 0.15
# bench/container_cost.py's section of RESULTS.md (its own run, after this one's)
CONTAINER_COST_BEGIN, CONTAINER_COST_END = "<!-- container-cost: bench/container_cost.py -->", "<!-- /container-cost -->"


# bench/source_cost.py's (its own run, after container_cost.py's)
SOURCE_COST_BEGIN, SOURCE_COST_END = "<!-- source-cost: bench/source_cost.py -->", "<!-- /source-cost -->"


def _section(text: str, begin: str, end: str) -> str | None:
    m = re.search(re.escape(begin) + ".*?" + re.escape(end) + "\n", text, re.S)
    return m.group(0) if m else None


def container_cost_section(text: str) -> str | None:
    """That section as it stands in `text` (markers and final newline included), or None."""
    return _section(text, CONTAINER_COST_BEGIN, CONTAINER_COST_END)


def source_cost_section(text: str) -> str | None:
    return _section(text, SOURCE_COST_BEGIN, SOURCE_COST_END)


def put_section(path: Path, begin: str, end: str, heading: str, prose: str, table: str, results: dict) -> None:
    """A later stage's section of RESULTS.md (its prose, the load average of its own run, its
    table): in place of its earlier one, else at the end."""
    load = " / ".join("/".join(f"{x:.2f}" for x in results[k]) for k in ("load_before", "load_after"))
    section = (f"{begin}\n## {heading}\n\n{prose} Load average before / after: {load} on "
               f"{os.cpu_count()} CPUs.\n\n{table}{end}\n")
    text = path.read_text() if path.exists() else ""
    old = _section(text, begin, end)
    path.write_text(text.replace(old, section) if old else text.rstrip("\n") + "\n\n" + section)

SUMMARY_BEGIN = "<!-- SUMMARY BEGIN: written by `make bench` (bench/report.py) from bench/results.json -->"
SUMMARY_END = "<!-- SUMMARY END -->"
README = Path(__file__).resolve().parents[1] / "README.md"
RATIO_FIGS = ["tcp_up_gbps", "tcp_down_gbps", "tcp_up_after_1k_gbps", "udp_mbps", "newconn_rps", "newconn_p99_ms",
              "newconn_wrk_rps", "newconn_wrk_p99_ms", "keepalive_rps", "keepalive_c2_rps",
              "keepalive_c1000_rps", "rss_idle_mb", "rss_1k_mb", "pss_idle_mb",
              "pss_1k_mb"]


def values(rounds: list[dict], key: str) -> list[float]:
    return [r[key] for r in rounds if r.get(key) is not None]


def med(rounds: list[dict], key: str) -> float | None:
    v = values(rounds, key)
    return statistics.median(v) if v else None


def cell(rounds: list[dict], key: str, fmt: str) -> str:
    v = values(rounds, key)
    if not v:
        return "—"
    m = fmt.format(statistics.median(v))
    text = m if len(v) == 1 else f"{m} [{fmt.format(min(v))}–{fmt.format(max(v))}]"
    if len(v) < len(rounds):
        text += f" ({len(v)}/{len(rounds)})"
    return text


def one_line(fig: dict) -> str:
    parts = []
    for key, (_title, fmt, _) in FIGURES.items():
        if fig.get(key) is not None:
            parts.append(f"{key}={fmt.format(fig[key])}")
    if fig.get("errors"):
        parts.append(f"errors={fig['errors']}")
    parts.append(f"({fig.get('elapsed_s', 0):.0f}s)")
    return " ".join(parts)


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}×"


def survived_only(peer_rounds: list[dict], key: str) -> bool:
    """A figure in fewer than half of the peer's rounds (the tool gave up in the others, e.g.
    ab on a connection unanswered for 5 s): its median is of the rounds it survived, not of the
    run, and is not compared as the best peer's (sparse_peers names it)."""
    return 0 < 2 * len(values(peer_rounds, key)) < len(peer_rounds)


def sparse_peers(rounds: dict[str, list[dict]], key: str) -> list[str]:
    """Peers left out of best_peer for `key`, as 'name median in k of n rounds'."""
    fmt = FIGURES[key][1]
    return [f"{PEERS[n]} {fmt.format(med(rounds[n], key))} in {len(values(rounds[n], key))} of "
            f"{len(rounds[n])} rounds" for n in PEERS if n in rounds and survived_only(rounds[n], key)]


def best_peer(rounds: dict[str, list[dict]], key: str) -> tuple[str, float] | None:
    """The peer with the best median of `key` (highest rate, lowest latency or memory), among
    those with a figure in at least half of their rounds."""
    higher = FIGURES[key][2]
    found = [(m, n) for n in PEERS
             if n in rounds and not survived_only(rounds[n], key) and (m := med(rounds[n], key)) is not None]
    if not found:
        return None
    m, n = (max if higher else min)(found, key=lambda f: f[0])
    return n, m


def verdict(ours: float, peer: float, higher: bool) -> str:
    """'ahead' / 'behind' / 'even' (within EVEN) for ours against a peer, with the ratio."""
    if peer == 0:
        return "—"
    r = ours / peer
    if abs(r - 1) <= EVEN:
        word = "even"
    else:
        word = "ahead" if (r > 1) == higher else "behind"
    return f"{r:.2f}× {word}"


def rounds_met(ours: list[dict], other: list[dict], key: str, factor: float = 1.0) -> tuple[int, int]:
    """(k, n): in k of the n rounds that gave both a figure, ours was at least `factor` × the
    other's of the same round (at most, for a figure where lower is better). The rounds are
    interleaved: round i of every forwarder ran minutes apart."""
    higher = FIGURES[key][2]
    pairs = [(a[key], b[key] * factor) for a, b in zip(ours, other, strict=False)  # a cut-short run: the rounds both have
             if a.get(key) is not None and b.get(key) is not None]
    return sum(1 for a, b in pairs if (a >= b if higher else a <= b)), len(pairs)


def rounds_won(ours: list[dict], peer: list[dict], key: str) -> str:
    """", k/n rounds" for a summary cell: a median ahead by less than the noise says little
    alone; ahead in most rounds says more."""
    won, n = rounds_met(ours, peer, key)
    return f", {won}/{n} rounds" if n else ""


def summary(res: dict) -> str:
    """The summary table and the figures of ours that have no peer (the README's copy)."""
    rounds: dict[str, list[dict]] = res["rounds"]
    ours, base = rounds.get(OURS), rounds.get(BASE)
    if not ours:
        return f"{OURS} was not measured in this run."
    n = res.get("params", {}).get("rounds", "?")
    out = [_wrap(f"Ours (builtin driver, rootful crun) against the best peer of each row: medians of "
                 f"{n} interleaved rounds of the run of {res.get('date', '?')}. Peers: "
                 + ", ".join(PEERS.values()) + f". \"even\": within {EVEN:.0%} of each other, the "
                 "noise of this shared machine; \"k/n rounds\": in k of the n rounds ours did at least as well "
                 "as that peer in the same round."), "",
           "| | ours (builtin) | best peer | ours ÷ best peer | direct loopback |",
           "|---|---|---|---|---|"]
    for key, title in SUMMARY_ROWS:
        fmt, higher = FIGURES[key][1], FIGURES[key][2]
        mine = med(ours, key)
        best = best_peer(rounds, key)
        loop = med(base, key) if base else None
        peer_cell = f"{fmt.format(best[1])} ({PEERS[best[0]]})" if best else "—"
        ratio_cell = (verdict(mine, best[1], higher) + rounds_won(ours, rounds[best[0]], key)
                      if best and mine is not None else "—")
        out.append(f"| {title} | {fmt.format(mine) if mine is not None else '—'} | {peer_cell} | "
                   f"{ratio_cell} | {fmt.format(loop) if loop is not None else '—'} |")
    missing = {PEERS[p] for p in PEERS if p in rounds and med(rounds[p], "udp_mbps") is None}
    notes = []
    for key, title in SUMMARY_ROWS:
        if sparse := sparse_peers(rounds, key):
            notes.append(f"{title}: not compared with {'; '.join(sparse)} (no figure in the others: "
                         "the tool gave up, see the notes of RESULTS.md).")
    if missing:
        notes.append(f"UDP: no figure for {', '.join(sorted(missing))} (no reply datagram reached "
                     "the client).")
    core = [med(ours, k) for k in ("core_rss_idle_mb", "core_rss_1k_mb")]
    if None not in core:
        notes.append(f"Ours alone: the relay process (`portfwd-core`) has an RSS of {core[0]:.1f} MB "
                     f"idle and {core[1]:.1f} MB with 1,000 connections.")
    # What the hook adds to a container's start and delete: bench/container_cost.py's rows
    # (README's prose quotes them), not this run's quick check.
    if notes:
        out += ["", _wrap(" ".join(notes))]
    if rounds.get(OURS_ROOTLESS):
        out += ["", rootless_summary(res)]
    return "\n".join(out)


def rootless_summary(res: dict) -> str:
    """Ours rootless against the best peer and against rootlesskit builtin (the rootless peer
    that does the same job), next to ours rootful."""
    rounds: dict[str, list[dict]] = res["rounds"]
    mine, rootful, rk = rounds[OURS_ROOTLESS], rounds.get(OURS), rounds.get(REF)
    out = [_wrap("Ours rootless: the same hook, config (source_address client, the default) and "
                 "servers, with crun, and so the hook, its supervisor and relay, run by an "
                 "unprivileged user in a user namespace (\"ours\" above is rootful: crun and the "
                 "hook run as root). Against the best peer and against rootlesskit builtin, the "
                 "rootless peer that does the same job:"), "",
           "| | ours rootless | ours rootful | best peer | rootless ÷ best peer | rootlesskit builtin "
           "| rootless ÷ rootlesskit |",
           "|---|---|---|---|---|---|---|"]

    def fmt_(key: str, v: float | None) -> str:
        return FIGURES[key][1].format(v) if v is not None else "—"

    for key, title in SUMMARY_ROWS:
        higher = FIGURES[key][2]
        a = med(mine, key)
        b = med(rootful, key) if rootful else None
        best = best_peer(rounds, key)
        r = med(rk, key) if rk else None
        peer_cell = f"{fmt_(key, best[1])} ({PEERS[best[0]]})" if best else "—"
        vs_best = (verdict(a, best[1], higher) + rounds_won(mine, rounds[best[0]], key)
                   if best and a is not None else "—")
        vs_rk = verdict(a, r, higher) + rounds_won(mine, rk, key) if a is not None and r is not None else "—"
        out.append(f"| {title} | {fmt_(key, a)} | {fmt_(key, b)} | {peer_cell} | {vs_best} | "
                   f"{fmt_(key, r)} | {vs_rk} |")
    notes = []
    for name, what in ((OURS, "rootful"), (OURS_ROOTLESS, "rootless")):
        seen = [r.get("service_sees_client") for r in rounds.get(name, [])]
        if seen and not all(seen):
            notes.append(f"Ours {what}: the service did not see the client's own address and port "
                         f"in {sum(1 for x in seen if not x)} of {len(seen)} rounds (source_address "
                         "client fell back to loopback, see the hook's log).")
    if notes:
        out += ["", _wrap(" ".join(notes))]
    return "\n".join(out)


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=95, break_long_words=False, break_on_hyphens=False)


def with_summary(text: str, res: dict) -> str | None:
    """`text` (README.md) with the part between the SUMMARY markers replaced by `summary(res)`;
    None when the markers are not there."""
    pattern = re.compile(re.escape(SUMMARY_BEGIN) + r"\n.*?" + re.escape(SUMMARY_END), re.S)
    if not pattern.search(text):
        return None
    return pattern.sub(lambda _: f"{SUMMARY_BEGIN}\n{summary(res)}\n{SUMMARY_END}", text, count=1)


def render(res: dict) -> str:
    rounds: dict[str, list[dict]] = res["rounds"]
    names = list(rounds)
    p = res.get("params", {})
    out: list[str] = []
    w = out.append
    w("# Benchmark results: oci-portfwd-hook and its peers\n")
    w(f"Generated by `make bench` (`bench/run.py`) on {res.get('date', '?')}, in "
      f"{res.get('duration_s', 0) / 60:.1f} min. {p.get('rounds', '?')} interleaved rounds "
      f"(every forwarder once per round, in the order of the tables, a fresh instance each time, "
      f"one forwarder alive at a time). Cells: **median [min–max]** over the rounds; "
      f"\"(2/3)\" = rounds that gave a figure. Load average before / after: "
      f"{_load(res.get('load_before'))} / {_load(res.get('load_after'))} on "
      f"{res.get('versions', {}).get('cpus', '?')} CPUs (other work was running on this "
      f"machine: treat differences under ~15% as noise).\n")
    w("Setup, identical for every forwarder: `iperf3 -s -p 5201` and `bench-httpd 8000` "
      "(bench/httpd.c, one-thread epoll server, 79-byte body) in a network namespace of their "
      "own (a crun container from the busybox-style rootfs for ours, run by root, or for ours "
      "rootless by an unprivileged user in a user namespace; rootlesskit's child; an "
      "`ip netns` for pasta, slirp4netns and socat), published on 127.0.0.1:IPERF_PORT "
      "(TCP+UDP) and 127.0.0.1:HTTP_PORT; every client runs in the host netns against "
      "127.0.0.1. Direct loopback = the same servers in the host netns, no forwarder. "
      "Per round and forwarder, two fresh instances: the first for the throughput and HTTP "
      "figures and idle memory, the second for memory with 1,000 connections held open and the "
      "TCP throughput after them (\"after 1k conns\")."
      + (f" The 2-connection keep-alive test starts after {p['settle_seconds']:g} idle seconds: "
         "on these VMs that rate, measured right after the 50-connection test, is in a slower "
         "mode for every forwarder (docs/data-path.md)." if p.get("settle_seconds") else "")
      + "\n")

    w("\n## Summary: ours against the best peer\n")
    w(summary(res) + "\n")

    for title, keys in TABLES:
        w(f"\n## {title}\n")
        w("| forwarder | " + " | ".join(FIGURES[k][0] for k in keys) + " |")
        w("|---|" + "---|" * len(keys))
        for n in names:
            w(f"| {LABELS.get(n, n)} | " + " | ".join(cell(rounds[n], k, FIGURES[k][1]) for k in keys) + " |")

    for ref, ref_title in ((REF, "rootlesskit builtin"), (BASE, "direct loopback")):
        if ref not in rounds:
            continue
        w(f"\n## Ratios to {ref_title} (median / median)\n")
        figs = [k for k in RATIO_FIGS if not (ref == BASE and k[:3] in ("rss", "pss"))]
        w("For rates: > 1 is better; for p99 and RSS: < 1 is better.\n")
        w("| forwarder | " + " | ".join(FIGURES[k][0] for k in figs) + " |")
        w("|---|" + "---|" * len(figs))
        for n in names:
            if n == ref:
                continue
            w(f"| {LABELS.get(n, n)} | " + " | ".join(
                ratio(med(rounds[n], k), med(rounds[ref], k)) for k in figs) + " |")

    w("\n## Forwarder CPU during each test (% of one core, all its processes)\n")
    w("Ours, pasta and slirp4netns relay in one thread: ≥ ~90% means the forwarder was the "
      "bottleneck of that test (rootlesskit is multi-threaded Go; socat forks per connection).\n")
    w("| forwarder | " + " | ".join(CPU.values()) + " |")
    w("|---|" + "---|" * len(CPU))
    for n in names:
        if n == BASE:
            continue
        w(f"| {LABELS.get(n, n)} | " + " | ".join(cell(rounds[n], k, "{:.0f}") for k in CPU) + " |")

    hs = res.get("hook_start")
    if hs:
        w(f"\n## Time the hook adds to a container start (crun, {p.get('hookstart_runs', '?')} "
          f"runs each, interleaved)\n")
        # Runs before 2026-11-29 had /bin/true there (bench/infra.py BASELINE_HOOK: why no more).
        baseline = next((v.removesuffix(" as hook") for v in hs if v.endswith(" as hook")), "a no-op")
        w("`crun run -d` of a trivial container (`/bin/sleep 600`, fresh netns) without hooks, with "
          f"`{baseline}` as prestart + poststop hook (what crun's running of any hook costs), and with "
          "our hook as prestart + poststop and one published port; `crun delete -f` is where "
          "poststop runs. All through the same cgroup wrapper. The target is on the builtin row.\n")
        w("| variant | `crun run -d` ms | added to the start, ms (median − median) | `crun delete` ms "
          "| added to the delete, ms | errors |")
        w("|---|---|---|---|---|---|")
        base = hs.get("no hook", {}).get("run_ms") or []
        base_del = hs.get("no hook", {}).get("delete_ms") or []
        for v, d in hs.items():
            r, dl = d.get("run_ms") or [], d.get("delete_ms") or []
            added = (f"{statistics.median(r) - statistics.median(base):+.1f}"
                     if r and base and v != "no hook" else "")
            added_del = (f"{statistics.median(dl) - statistics.median(base_del):+.1f}"
                         if dl and base_del and v != "no hook" else "")
            w(f"| {v} | {_dist(r)} | {added} | {_dist(dl)} | {added_del} | "
              f"{len(d.get('errors', []))} |")

    w("\n## Targets (issue \"Performance\")\n")
    w(_targets(rounds, hs))

    w("\n## Notes (generated from the figures)\n")
    w(_notes(rounds, res))

    w("\n## Versions\n")
    for k, v in (res.get("versions") or {}).items():
        w(f"- {k}: {v}")

    w("\n## Exact commands\n")
    w("Ports and names that change per run are written as IPERF_PORT, HTTP_PORT, NAME, ID, "
      "WORK (a temporary directory), STATE. Clients (every forwarder, host netns):\n")
    s, n = p.get("seconds", 3), p.get("requests", 20000)
    ip, hp = "IPERF_PORT", "HTTP_PORT"
    w("```")
    for argv, what in (
            (clients.iperf_argv(ip, s), "TCP host→ctr"),
            (clients.iperf_argv(ip, s, reverse=True), "TCP ctr→host"),
            (clients.ab_argv(hp, n, 50, "ab.csv"), "new connection per request; p99 from the csv"),
            (clients.wrk_argv(hp, s, 50, close=True), "new connection per request"),
            (clients.wrk_argv(hp, s, 50), "keep-alive"),
            (clients.wrk_argv(hp, s, 2), "keep-alive, 2 connections"),
            (clients.wrk_argv(hp, s, 1000), "keep-alive, 1,000 connections"),
            (clients.iperf_argv(ip, s, udp=True), "UDP")):
        w(f"{shlex.join(str(a) for a in argv):<95} # {what}")
    w(f"python: {p.get('hold_connections', 1000)} connections to HTTP_PORT opened one after the "
      "other, one keep-alive GET answered on each, held open while VmRSS/PSS are read")
    w("```")
    w("Servers and forwarders:\n")
    for key, cmds in (res.get("commands") or {}).items():
        w(f"- **{LABELS.get(key, key)}**")
        w("  ```")
        for c in cmds:
            w(f"  {c}")
        w("  ```")
    w("\nRSS counts: ours (rootful and rootless) = supervisor + core + dialer (and the slirp4netns / pasta child with "
      "those drivers), \"core\" = the relay process alone (`portfwd-core`; `portfwd-slirp` / "
      "`portfwd-pasta` + their program for the other drivers); rootlesskit = parent + child + its "
      "slirp4netns (not the servers); socat = the three listening socats and their forked "
      "children; pasta / slirp4netns = the one process. MB = 10^6 bytes.")
    return "\n".join(out) + "\n"


def _load(la) -> str:
    return "?" if not la else "/".join(f"{x:.2f}" for x in la)


def _dist(v: list[float]) -> str:
    if not v:
        return "—"
    return f"{statistics.median(v):.1f} [{min(v):.1f}–{max(v):.1f}]"


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def _targets(rounds: dict, hs: dict | None) -> str:
    lines = []
    ours = rounds.get(OURS)
    if ours is None:
        return "ours-builtin was not measured in this run."

    def cmp(label: str, key: str, other: str | None, factor: float, mine: list[dict] = ours) -> None:
        higher = FIGURES[key][2]  # as rounds_met reads it
        a = med(mine, key)
        b = med(rounds[other], key) if other and other in rounds else None
        if a is None or b is None:
            lines.append(f"- {label}: n/a (no figure)")
            return
        goal = b * factor
        ok = a >= goal if higher else a <= goal
        met, n = rounds_met(mine, rounds[other], key, factor)
        lines.append(f"- {label}: {_num(a)} vs goal {_num(goal)} → {_verdict(ok)} "
                     f"({a / b:.2f}× {other}; {100 * (a - goal) / goal:+.0f}% against the goal; "
                     f"met in {met}/{n} rounds)")

    for key, d in (("tcp_up_gbps", "host→ctr"), ("tcp_down_gbps", "ctr→host")):
        cmp(f"TCP {d} ≥ 1.0 × rootlesskit builtin", key, REF, 1.0)
        cmp(f"TCP {d} ≥ 0.8 × direct loopback", key, BASE, 0.8)  # issue 15
    cmp("keep-alive rate ≥ 0.5 × direct loopback", "keepalive_rps", BASE, 0.5)  # issue 15
    cmp("new-connection rate (ab) ≥ 1.0 × rootlesskit builtin", "newconn_rps", REF, 1.0)
    cmp("new-connection rate (wrk) ≥ 1.0 × rootlesskit builtin (same target, client not ab-bound)",
        "newconn_wrk_rps", REF, 1.0)
    # source_address: `client` (ours-builtin, the default) against `loopback`, same run.
    for key, what in (("tcp_up_gbps", "TCP host→ctr"), ("tcp_down_gbps", "TCP ctr→host"),
                      ("newconn_rps", "new-connection rate (ab)"),
                      ("newconn_wrk_rps", "new-connection rate (wrk)")):
        cmp(f"{what}, source_address client ≥ 0.95 × loopback", key, OURS_LOOPBACK, 0.95)
    lines.append("- The same two, new connections, measured side by side (figures seconds apart, not "
                 "a forwarder apart): bench/source_cost.py's section at the end.")
    cmp("p99 latency (ab) ≤ rootlesskit's", "newconn_p99_ms", REF, 1.0)
    cmp("p99 latency (wrk, new connections) ≤ rootlesskit's", "newconn_wrk_p99_ms", REF, 1.0)
    rootless = rounds.get(OURS_ROOTLESS)
    if rootless:
        for key, what in (("tcp_up_gbps", "TCP host→ctr"), ("tcp_down_gbps", "TCP ctr→host"),
                          ("newconn_rps", "new-connection rate (ab)"),
                          ("newconn_wrk_rps", "new-connection rate (wrk)"),
                          ("keepalive_rps", "keep-alive rate"),
                          ("newconn_p99_ms", "p99 latency (ab)")):
            cmp(f"rootless: {what} {'≥' if FIGURES[key][2] else '≤'} rootlesskit builtin's", key, REF, 1.0,
                mine=rootless)
    for key, limit, label in (("core_rss_idle_mb", 20, "core RSS idle ≤ 20 MB"),
                              ("core_rss_1k_mb", 40, "core RSS with 1,000 connections ≤ 40 MB")):
        a = med(ours, key)
        tot = med(ours, key.replace("core_", ""))
        if a is None:
            lines.append(f"- {label}: n/a")
        else:
            total = f"; supervisor + core + dialer: {tot:.1f} MB" if tot is not None else ""
            lines.append(f"- {label}: {a:.1f} MB → {_verdict(a <= limit)} "
                         f"({100 * (a - limit) / limit:+.0f}% against the goal{total})")
    if hs and hs.get("no hook", {}).get("run_ms") and hs.get("hook, builtin", {}).get("run_ms"):
        added = statistics.median(hs["hook, builtin"]["run_ms"]) - statistics.median(hs["no hook"]["run_ms"])
        lines.append(f"- hook adds ≤ 60 ms to a container start (median): {added:.1f} ms → "
                     f"{_verdict(added <= 60)} ({100 * (added - 60) / 60:+.0f}%)")
    return "\n".join(lines)


# What an error of a test means, for the notes.
WHY = [
    ("udp", "timed out", " (no UDP reply datagram reached the client; iperf3's UDP test needs "
     "the server's first reply, so there is no figure)"),
    ("newconn", "apr_pollset_poll", " (a connection got no answer within ab's 5 s timeout and ab "
     "gives up: no ab figure; see the wrk column)"),
    ("hold_1k", "timed out", " (a connection of the 1,000 got no answer within 5 s: no RSS figure)"),
]


def _notes(rounds: dict, res: dict) -> str:
    lines = []
    base = rounds.get(BASE)
    if base:
        ab, wrk = med(base, "newconn_rps"), med(base, "newconn_wrk_rps")
        ka = med(base, "keepalive_rps")
        if ab and wrk:
            lines.append(
                f"- Client and server ceiling (direct loopback, no forwarder): ab {ab:,.0f} new "
                f"connections/s, wrk {wrk:,.0f}/s with `Connection: close`, {ka or 0:,.0f}/s "
                f"keep-alive. ab is one thread: a forwarder near {ab:,.0f}/s is ab-bound, which "
                f"is why the wrk column is there too.")
    for n, rs in rounds.items():
        if n == BASE:
            continue
        hot = [CPU[k] for k in CPU if (med(rs, k) or 0) >= 90]
        if hot:
            lines.append(f"- {LABELS.get(n, n)}: ≥ 90% of one core during {', '.join(hot)}"
                         + (" (one thread: the bottleneck there)." if n.startswith("ours")
                            or n in ("pasta", "slirp4netns") else "."))
    short = [f"{LABELS.get(n, n)} {v:,.0f}" for n, rs in rounds.items()
             if (v := med(rs, "keepalive_c1000_served")) is not None and v < 900]
    if short:
        lines.append("- Keep-alive with 1,000 connections: wrk's rate × its mean latency is the "
                     "number of connections that were being served (Little's law); under 1,000 "
                     "means the rest waited unanswered, and the p99 describes only those served "
                     "(over 1,000: wrk's correction for coordinated omission, samples it adds for "
                     "very long latencies, raised the mean): "
                     + ", ".join(short) + ".")
    for n, rs in rounds.items():
        fresh, after = med(rs, "tcp_up_gbps"), med(rs, "tcp_up_after_1k_gbps")
        if fresh and after and after < 0.8 * fresh:
            lines.append(f"- {LABELS.get(n, n)}: TCP host→ctr after 1,000 connections were held and "
                         f"closed is {after / fresh:.2f}× that of a fresh instance ({_num(after)} vs "
                         f"{_num(fresh)} Gbit/s).")
    for n, rs in rounds.items():
        seen = [r.get("service_sees_client") for r in rs if "service_sees_client" in r]
        if seen:
            setting = rs[0].get("source_address", "?")
            lines.append(f"- {LABELS.get(n, n)}: source_address {setting}; the HTTP server saw the "
                         f"client's own address and port in {sum(1 for x in seen if x)} of {len(seen)} "
                         "rounds (a connection's peer in the container's /proc/PID/net/tcp*)"
                         + (", as it should" if all(seen) == (setting == "client") else ": **not as set**")
                         + ".")
    for n, rs in rounds.items():
        z = [r.get("zombies") or 0 for r in rs]
        if any(z):
            lines.append(f"- {LABELS.get(n, n)}: zombie processes in the forwarder's tree at the "
                         f"end of each round: {z} (children nobody reaps).")
    for n, rs in rounds.items():
        errs: dict[str, list[str]] = {}
        for i, r in enumerate(rs):
            for k, e in (r.get("errors") or {}).items():
                errs.setdefault(k, []).append(f"round {i + 1}: {e}")
        for k, es in errs.items():
            why = next((text for key, pat, text in WHY if key == k and any(pat in e for e in es)), "")
            lines.append(f"- {LABELS.get(n, n)}, {k}{why}: " + "; ".join(es)[:500])
    return "\n".join(lines) if lines else "- nothing to note"


def main(argv: list[str]) -> int:
    """Re-render RESULTS.md next to results.json, and README.md's summary when the run measured
    every forwarder (a partial run would make a partial "best peer")."""
    src = Path(argv[0]) if argv else Path(__file__).resolve().parent / "results.json"
    res = json.loads(src.read_text())
    out = src.parent / "RESULTS.md"
    text = render(res)
    before = out.read_text() if out.exists() else ""
    for old in (container_cost_section(before), source_cost_section(before)):
        if old:  # the sections of bench/container_cost.py and bench/source_cost.py: kept
            text = text.rstrip("\n") + "\n\n" + old
    out.write_text(text)
    print(f"wrote {src.parent / 'RESULTS.md'}")
    if src.parent == Path(__file__).resolve().parent:  # a copy elsewhere leaves README alone
        print(update_readme(res))
    return 0


def update_readme(res: dict, readme: Path = README) -> str:
    """Write the summary into README.md; returns what was done, for the log."""
    absent = [n for n in FORWARDERS if not res["rounds"].get(n)]
    if absent:
        return f"{readme} left alone: this run did not measure {', '.join(absent)}"
    new = with_summary(readme.read_text(), res)
    if new is None:
        return f"{readme} left alone: no {SUMMARY_BEGIN!r} … {SUMMARY_END!r} in it"
    readme.write_text(new)
    return f"wrote the summary into {readme}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
