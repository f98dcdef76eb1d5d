"""`make bench`: the same servers behind every forwarder, measured in one run on one machine.

    .venv/bin/python bench/run.py [--rounds 3] [--seconds 3] [--requests 20000]
                                  [--only ours-builtin,rootlesskit-builtin,loopback] [--out bench]

Rounds are interleaved (A B C, B C A, C A B, …): each forwarder gets a fresh instance per round and
only one forwarder exists at a time. Writes bench/RESULTS.md (and bench/results.json, the raw
figures of every round) and, after a run of every forwarder, README.md's performance table.
Everything made is undone on exit, failures and signals included.
Needs root (crun, netns, veth, mknod, useradd: rootlesskit and ours-rootless run as an
unprivileged user). See bench/README.md for the method.
"""

import argparse
import json
import os
import platform
import pwd
import shlex
import shutil
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import clients  # noqa: E402
import report  # noqa: E402
from forwarders import (  # noqa: E402
    CRUN_WRAPPER,
    FORWARDERS,
    HYBRID_CONTROLLERS,
    BenchUser,
    CrunContainer,
    Env,
    RootlessCrun,
)
from infra import (  # noqa: E402
    BASELINE_HOOK,
    BASELINE_HOOK_ARGS,
    BASELINE_LABEL,
    Cleanup,
    CommandLog,
    free_port,
    pss_kib,
    root_session,
    run,
)

BENCH_USER = "portfwd-bench"
HOLD_CONNECTIONS = 1000
CONCURRENCY = 50
SCALE_CONNECTIONS = (2, 1000)  # keep-alive again with these many connections
# Idle seconds before a test with few connections. On these 2-vCPU VMs a 2-connection rate
# measured right after the 50-connection test is in a slower mode for every forwarder and
# recovers within a couple of idle seconds (docs/data-path.md): a 3 s run of ours 21-59k req/s
# at once, 55-84k after 2 s, 57-85k after 5 s; socat 20-31k, 29-38k, 30-56k. The test used to
# follow the two-part-request test, which lasts 0.2 s through a forwarder without Nagle's delay
# and 13 s through one with it: a rest for some forwarders and not others.
SETTLE_SECONDS = 5.0
HOOKSTART_RUNS = 20
DEB_PACKAGES = ["crun", "rootlesskit", "slirp4netns", "passt", "socat", "iperf3",
                "apache2-utils", "wrk", "busybox-static", "util-linux", "iproute2", "gcc"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------ preparation


def build_httpd(work: Path) -> Path:
    bindir = work / "bin"
    bindir.mkdir(mode=0o755)
    out = bindir / "bench-httpd"
    run(["gcc", "-O2", "-Wall", "-o", str(out), str(HERE / "httpd.c")])
    return out


def build_rootfs(work: Path, httpd: Path) -> Path:
    """busybox-style image that borrows the host's /usr (iperf3, sh) read-only."""
    rootfs = work / "rootfs"
    for d in ("proc", "sys", "dev", "tmp", "etc", "usr", "srv"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    for name, target in {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib",
                         "lib64": "usr/lib64"}.items():
        (rootfs / name).symlink_to(target)
    (rootfs / "etc" / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
    shutil.copy(httpd, rootfs / "srv" / "bench-httpd")
    return rootfs


def hybrid_cgroups() -> bool:
    try:
        return HYBRID_CONTROLLERS.read_text().strip() != ""
    except OSError:
        return False


def crun_for_run(work: Path) -> str:
    if not hybrid_cgroups():
        return shutil.which("crun") or "crun"
    wrapper = work / "crun-wrapper"
    wrapper.write_text(CRUN_WRAPPER.format(controllers=HYBRID_CONTROLLERS))
    wrapper.chmod(0o755)
    return str(wrapper)


def ensure_bench_user(cleanup: Cleanup) -> BenchUser:
    """rootlesskit refuses root; it runs as this user (made, and removed at the end, when absent).
    ours-rootless runs crun as this user too."""
    try:
        pw = pwd.getpwnam(BENCH_USER)
    except KeyError:
        run(["useradd", "-m", "-s", "/usr/sbin/nologin", BENCH_USER])
        cleanup.push(f"user {BENCH_USER}", lambda: run(["userdel", "-r", BENCH_USER], check=False))
        pw = pwd.getpwnam(BENCH_USER)
    return BenchUser(BENCH_USER, pw.pw_uid, pw.pw_gid, Path(pw.pw_dir))


# Rootless crun on a hybrid cgroup host: the controllers file is masked in a mount namespace
# made as root, and the user is dropped to inside it, right before crun (tests/e2e/e2ekit/runtimes.py).
ROOTLESS_CRUN_WRAPPER = """#!/bin/sh
exec unshare -m --propagation slave sh -c \\
  'mount --bind /dev/null {controllers} && exec "$@"' crun {as_user} crun "$@"
"""


def prepare_rootless(work: Path, user: BenchUser, hook: Path) -> RootlessCrun:
    """ours-rootless: a 0700 directory of the user's (removed with the work dir) for crun's state,
    the bundles, XDG_RUNTIME_DIR and the hook's config and state dir; the hook's config is the
    rootful builtin row's (source_address: its default, client)."""
    area = work / "rootless"
    for d in (area, area / "xdg", area / "crun-root", area / "hook"):
        d.mkdir(mode=0o700)
        os.chown(d, user.uid, user.gid)
    hook_state = area / "hook" / "state"
    hook_config = area / "hook" / "oci-portfwd.json"
    hook_config.write_text(json.dumps({"state_dir": str(hook_state), "log_level": "info"}))
    os.chown(hook_config, user.uid, user.gid)
    as_user = user.prefix(f"XDG_RUNTIME_DIR={area / 'xdg'}")
    crun = shutil.which("crun") or "crun"
    crun_run = [*as_user, crun]
    if hybrid_cgroups():
        wrapper = work / "crun-rootless-wrapper"   # root's: the user cannot replace it
        wrapper.write_text(ROOTLESS_CRUN_WRAPPER.format(controllers=HYBRID_CONTROLLERS,
                                                        as_user=shlex.join(as_user)))
        wrapper.chmod(0o755)
        crun_run = [str(wrapper)]
    rc = RootlessCrun(user=user, area=area, crun_run=crun_run, crun=[*as_user, crun],
                      crun_root=area / "crun-root", hook_config=hook_config, hook_state=hook_state)
    res = run([*as_user, str(hook), "--version"], check=False, cwd="/")
    if res.returncode != 0:
        rc.problem = (f"the user {user.name} cannot run {hook} (is every parent directory "
                      f"traversable by others?): {(res.stderr or res.stdout).strip()[-300:]}")
    return rc


def private_tun_node(work: Path) -> Path:
    """A 0666 tun node for the rootlesskit runs, bind-mounted over /dev/net/tun in their private
    mount namespace only; it sits in a 0700 directory, so nobody else can open it."""
    priv = work / "priv"
    priv.mkdir(mode=0o700)
    node = priv / "tun"
    run(["mknod", "-m", "0666", str(node), "c", "10", "200"])
    return node


def versions() -> dict[str, str]:
    out: dict[str, str] = {}
    res = run(["dpkg-query", "-W", "-f", "${Package} ${Version}\n", *DEB_PACKAGES], check=False)
    for line in res.stdout.splitlines():
        name, _, ver = line.partition(" ")
        out[name] = ver
    out["kernel"] = platform.release()
    out["python"] = platform.python_version()
    hook = run([str(REPO / ".venv/bin/oci-portfwd-hook"), "--version"], check=False).stdout.strip()
    head = run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=False).stdout.strip()
    dirty = run(["git", "-C", str(REPO), "status", "--porcelain", "--", "hook"], check=False).stdout.strip()
    out["oci-portfwd-hook"] = f"{hook} (git {head}{', hook/ modified' if dirty else ''})"
    out["cpus"] = str(os.cpu_count())
    idle = cpu_idle()
    if idle:
        out["cpu idle"] = idle
    return out


def cpu_idle() -> str:
    """The CPUs' idle driver and, in a VM guest with haltpoll, how long an idle vCPU polls before
    it halts: the rows with few connections wait on waking halted vCPUs when that is 0 (every
    forwarder and direct loopback alike; docs/data-path.md)."""
    try:
        driver = Path("/sys/devices/system/cpu/cpuidle/current_driver").read_text().strip()
    except OSError:
        return ""
    try:
        ns = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns").read_text().strip()
    except OSError:
        return driver
    return f"{driver}, guest_halt_poll_ns {ns}"


def prepare(work: Path, cleanup: Cleanup, cmdlog: CommandLog, hook: Path, rootlesskit: bool,
            rootless_crun: bool = False) -> Env:
    """Server binary, image, crun wrapper, the hook's config; the bench user for rootlesskit
    and for rootless crun."""
    httpd = build_httpd(work)
    rootfs = build_rootfs(work, httpd)
    crun_root = work / "crun-root"
    crun_root.mkdir(mode=0o700)
    hook_state = work / "hook-state"
    hook_config = work / "oci-portfwd.json"
    hook_config.write_text(json.dumps({"state_dir": str(hook_state), "log_level": "info"}))
    env = Env(work=work, cleanup=cleanup, cmdlog=cmdlog, ports=set(), httpd=httpd,
              rootfs=rootfs, crun_run=crun_for_run(work), crun_root=crun_root, hook=hook,
              hook_config=hook_config, hook_state=hook_state)
    if rootlesskit or rootless_crun:
        env.bench_user = ensure_bench_user(cleanup)
    if rootlesskit:
        env.tun_node = private_tun_node(work)
    if rootless_crun:
        assert env.bench_user is not None
        env.rootless = r = prepare_rootless(work, env.bench_user, hook)
        what = (f"WORK/crun-rootless-wrapper = {ROOTLESS_CRUN_WRAPPER.split(chr(10), 1)[1]}"
                .replace("\\\n", "").replace("{controllers}", str(HYBRID_CONTROLLERS))
                .replace("{as_user}", shlex.join(r.crun[:-1])) if hybrid_cgroups()
                else shlex.join(r.crun_run) + " (as WORK/crun-rootless-wrapper below)")
        cmdlog.note("ours-rootless", " ".join(what.replace(str(work), "WORK").split()))
        cmdlog.note("ours-rootless", "crun kill / delete: " + shlex.join(r.crun).replace(str(work), "WORK")
                    + " --root WORK/rootless/crun-root …")
    return env


# ------------------------------------------------------------------ measurements


def settle() -> None:
    """The rest before a test with few connections (SETTLE_SECONDS)."""
    time.sleep(SETTLE_SECONDS)


def measure(inst, seconds: int, requests: int, work: Path, do_udp: bool) -> dict:
    fig: dict = {"errors": {}, "t": {}}
    t_last = [time.monotonic()]

    def mark(step: str) -> None:
        now = time.monotonic()
        fig["t"][step] = round(now - t_last[0], 2)
        t_last[0] = now

    def note_err(key: str, res: dict) -> None:
        if res.get("error"):
            fig["errors"][key] = res["error"]

    fig.update(inst.facts)
    time.sleep(0.5)
    fig["rss_idle_mb"] = _mb(inst.procs())
    fig["core_rss_idle_mb"] = _mb(inst.core_procs())
    fig["pss_idle_mb"] = _pss(inst.procs())
    mark("idle")

    for key, reverse in (("tcp_up", False), ("tcp_down", True)):
        with clients.CpuMeter(inst.procs) as cpu:
            res = clients.iperf_tcp(inst.iperf_port, seconds, reverse)
        fig[f"{key}_gbps"], fig[f"cpu_{key}"] = res["gbps"], cpu.percent
        note_err(key, res)
        mark(key)

    csv = work / "ab.csv"
    with clients.CpuMeter(inst.procs) as cpu:
        res = clients.ab_close(inst.http_port, requests, CONCURRENCY, csv)
    fig["newconn_rps"], fig["newconn_p99_ms"], fig["cpu_newconn"] = res["rps"], res["p99_ms"], cpu.percent
    note_err("newconn", res)
    mark("newconn")

    with clients.CpuMeter(inst.procs) as cpu:
        res = clients.wrk(inst.http_port, seconds, CONCURRENCY, close=True)
    fig["newconn_wrk_rps"], fig["cpu_newconn_wrk"] = res["rps"], cpu.percent
    fig["newconn_wrk_p99_ms"] = res.get("p99_ms")
    note_err("newconn_wrk", res)
    mark("newconn_wrk")

    with clients.CpuMeter(inst.procs) as cpu:
        res = clients.wrk(inst.http_port, seconds, CONCURRENCY)
    fig["keepalive_rps"], fig["cpu_keepalive"] = res["rps"], cpu.percent
    fig["keepalive_p99_ms"] = res.get("p99_ms")
    note_err("keepalive", res)
    mark("keepalive")

    # Scale: the same keep-alive test with 2 and with 1,000 connections.
    for conns in SCALE_CONNECTIONS:
        if conns < CONCURRENCY:
            settle()
            mark(f"settle_c{conns}")
        with clients.CpuMeter(inst.procs) as cpu:
            res = clients.wrk(inst.http_port, seconds, conns)
        fig[f"keepalive_c{conns}_rps"], fig[f"cpu_keepalive_c{conns}"] = res["rps"], cpu.percent
        fig[f"keepalive_c{conns}_p99_ms"] = res.get("p99_ms")
        if res.get("rps") and res.get("avg_ms"):
            fig[f"keepalive_c{conns}_served"] = res["rps"] * res["avg_ms"] / 1000
        note_err(f"keepalive_c{conns}", res)
        mark(f"keepalive_c{conns}")

    # Latency of a request written in two parts (no CPU meter: one connection, mostly waiting).
    res = clients.split_requests(inst.http_port)
    fig["split_req_ms"], fig["split_req_p99_ms"] = res["median_ms"], res.get("p99_ms")
    note_err("split_req", res)
    mark("split_req")
    # The forwarder's CPU per request (all its processes), µs: its CPU share over the rate.
    for key, cpu_key, rps_key in (("cpu_us_ka_c2", "cpu_keepalive_c2", "keepalive_c2_rps"),
                                  ("cpu_us_ka_c50", "cpu_keepalive", "keepalive_rps"),
                                  ("cpu_us_ka_c1000", "cpu_keepalive_c1000", "keepalive_c1000_rps"),
                                  ("cpu_us_newconn_wrk", "cpu_newconn_wrk", "newconn_wrk_rps")):
        if fig.get(cpu_key) is not None and fig.get(rps_key):
            fig[key] = fig[cpu_key] / 100 * 1e6 / fig[rps_key]

    if do_udp:
        with clients.CpuMeter(inst.procs) as cpu:
            res = clients.iperf_udp(inst.iperf_port, seconds)
        fig["udp_mbps"], fig["udp_loss_pct"], fig["cpu_udp"] = res["mbps"], res["loss_pct"], cpu.percent
        note_err("udp", res)
        mark("udp")
    procs = inst.procs()
    fig["procs"] = sorted({p.comm() for p in procs})
    fig["zombies"] = sum(1 for p in procs if not p.alive())
    return fig


def measure_hold(inst, seconds: int) -> dict:
    """On a fresh instance of the forwarder: RSS with 1,000 connections held open, then TCP
    throughput after them. Fresh, because the HTTP tests' tens of thousands of connections make
    slirp4netns stall new connections for seconds, and because holding 1,000 connections halves
    rootlesskit builtin's TCP throughput for the rest of its life (both seen here): the main
    figures are taken on an instance that never held them."""
    fig: dict = {"errors": {}, "t": {}}
    t0 = time.monotonic()
    time.sleep(0.5)
    socks, err = clients.hold_connections(inst.http_port, HOLD_CONNECTIONS)
    try:
        time.sleep(0.5)
        if err is None:
            fig["rss_1k_mb"] = _mb(inst.procs())
            fig["core_rss_1k_mb"] = _mb(inst.core_procs())
            fig["pss_1k_mb"] = _pss(inst.procs())
        fig["procs_1k"] = sum(1 for p in inst.procs() if p.alive())
    finally:
        clients.close_all(socks)
    if err:
        fig["errors"]["hold_1k"] = err
    time.sleep(1)
    with clients.CpuMeter(inst.procs) as cpu:
        res = clients.iperf_tcp(inst.iperf_port, seconds, False)
    fig["tcp_up_after_1k_gbps"], fig["cpu_tcp_up_after_1k"] = res["gbps"], cpu.percent
    if res.get("error"):
        fig["errors"]["tcp_up_after_1k"] = res["error"]
    fig["t"]["hold_1k"] = round(time.monotonic() - t0, 2)
    return fig


def _pss(procs) -> float | None:
    if not procs:
        return None
    return sum(pss_kib(p.pid) for p in procs) * 1024 / 1e6


def _mb(procs) -> float | None:
    mib = clients.rss_mib(procs)
    return None if mib is None else mib * 1024 * 1024 / 1e6


def hook_start(env: Env, runs: int, drivers: list[str]) -> dict:
    """`crun run -d` of a trivial container (sleep) without the hook and with it (per driver),
    interleaved; also the `crun delete` time (where poststop runs)."""
    # The baseline hook (infra.BASELINE_HOOK): what crun's running of any prestart + poststop
    # hook costs.
    variants: dict[str, str | None] = {"no hook": None, f"{BASELINE_LABEL} as hook": "baseline"}
    variants.update({f"hook, {d}": d for d in drivers})
    out = {v: {"run_ms": [], "delete_ms": []} for v in variants}
    for i in range(runs):
        for v, driver in variants.items():
            cleanup = Cleanup()
            token = env.cleanup.push("hook-start container", cleanup.run_all)
            try:
                ann = {}
                if driver and driver != "baseline":
                    ann = {"io.oci-portfwd.ports": f"127.0.0.1:{free_port(env.ports)}:80",
                           "io.oci-portfwd.driver": driver}
                c = CrunContainer(env, cleanup, ["/bin/sleep", "600"], ann, hooks=driver is not None,
                                  hook_path=BASELINE_HOOK if driver == "baseline" else None,
                                  hook_args=BASELINE_HOOK_ARGS if driver == "baseline" else None)
                if i == 0:
                    env.cmdlog.note("hook-start", f"[{v}] " + " ".join(
                        a.replace(c.id, "ID").replace(str(env.work), "WORK") for a in c.run_argv())
                        + (f"  (annotations {json.dumps(ann)})" if ann else ""))
                out[v]["run_ms"].append(c.run() * 1000)
                out[v]["delete_ms"].append(c.stop() * 1000)
            except Exception as exc:  # noqa: BLE001
                out[v].setdefault("errors", []).append(str(exc)[:300])
            finally:
                env.cleanup.pop(token)
    return out


# ------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", 3)))
    ap.add_argument("--seconds", type=int, default=int(os.environ.get("BENCH_SECONDS", 3)),
                    help="duration of each iperf3 and wrk run")
    ap.add_argument("--requests", type=int, default=int(os.environ.get("BENCH_REQUESTS", 20000)),
                    help="ab requests (one connection each)")
    ap.add_argument("--hookstart-runs", type=int, default=HOOKSTART_RUNS)
    ap.add_argument("--hookstart-drivers", default="builtin",
                    help="drivers timed at container start (e.g. builtin,slirp4netns,pasta)")
    ap.add_argument("--only", default=os.environ.get("BENCH_ONLY", ""),
                    help="comma-separated forwarders (default: all): " + ",".join(FORWARDERS))
    ap.add_argument("--no-udp", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()

    names = [n for n in args.only.split(",") if n] or list(FORWARDERS)
    unknown = [n for n in names if n not in FORWARDERS]
    if unknown:
        print(f"bench: unknown forwarders {unknown}; known: {list(FORWARDERS)}", file=sys.stderr)
        return 2
    hook = REPO / ".venv/bin/oci-portfwd-hook"
    if not hook.exists():
        print(f"bench: {hook} is missing: run `make venv`", file=sys.stderr)
        return 2

    session = root_session("bench", "oci-portfwd-bench-")
    if session is None:
        return 2
    cleanup, work = session
    cmdlog = CommandLog()
    started = time.time()
    load_before = os.getloadavg()
    results: dict = {"rounds": {n: [] for n in names}}
    try:
        log(f"bench: work dir {work}")
        env = prepare(work, cleanup, cmdlog, hook, rootlesskit=any(n.startswith("rootlesskit") for n in names),
                      rootless_crun="ours-rootless" in names)
        results["versions"] = versions()
        results["params"] = {"rounds": args.rounds, "seconds": args.seconds,
                             "requests": args.requests, "concurrency": CONCURRENCY,
                             "settle_seconds": SETTLE_SECONDS,
                             "hold_connections": HOLD_CONNECTIONS,
                             "hookstart_runs": args.hookstart_runs, "forwarders": names}

        drivers = [d for d in args.hookstart_drivers.split(",") if d]
        log(f"hook start overhead: {args.hookstart_runs} x {2 + len(drivers)} interleaved crun runs")
        results["hook_start"] = hook_start(env, args.hookstart_runs, drivers)

        for rnd in range(args.rounds):
            # Each round starts one forwarder further on (A B C, B C A, C A B, …): whatever the
            # one before leaves behind (TIME_WAIT sockets, a busy page cache, a CPU's frequency)
            # falls on every forwarder in turn, not always on the same neighbour.
            shift = rnd % len(names)
            for name in names[shift:] + names[:shift]:
                log(f"round {rnd + 1}/{args.rounds}: {name}")
                t0 = time.monotonic()
                fig: dict = {"errors": {}, "t": {}}
                for part, fn in (("main", lambda i: measure(i, args.seconds, args.requests, work,
                                                           not args.no_udp)),
                                 ("hold", lambda i: measure_hold(i, args.seconds))):
                    inst = None
                    try:
                        inst = FORWARDERS[name](env)
                        got = fn(inst)
                        fig["errors"].update(got.pop("errors"))
                        fig["t"].update(got.pop("t"))
                        fig.update(got)
                    except Exception as exc:  # noqa: BLE001 - one forwarder failing is a result
                        fig["errors"][f"setup ({part})"] = f"{type(exc).__name__}: {exc}"[:600]
                        traceback.print_exc()
                    finally:
                        if inst is not None:
                            inst.teardown()
                fig["elapsed_s"] = time.monotonic() - t0
                results["rounds"][name].append(fig)
                log("   " + report.one_line(fig))
    except KeyboardInterrupt:
        log("bench: interrupted; cleaning up")
        cleanup.run_all()
        return 130
    finally:
        results["commands"] = cmdlog.by_key
        results["load_before"], results["load_after"] = load_before, os.getloadavg()
        results["duration_s"] = time.time() - started
        results["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        cleanup.run_all()

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    md = report.render(results)
    (args.out / "RESULTS.md").write_text(md)
    if args.out.resolve() == HERE:
        # README.md's performance table is RESULTS.md's summary, from this same run.
        log("bench: " + report.update_readme(results))
    log(f"bench: done in {results['duration_s'] / 60:.1f} min; results in "
        f"{args.out / 'RESULTS.md'} (raw: {args.out / 'results.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
