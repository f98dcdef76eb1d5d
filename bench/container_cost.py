"""What each container pays for the hook (issue 12), next to its peers' per-container cost.

    .venv/bin/python bench/container_cost.py [--runs 12] [--runtimes crun,runc] [--counts 1,30]
                                             [--out bench/container_cost.json]

Rows:
- start and delete: `RUNTIME run -d` and `RUNTIME delete -f` (poststop runs there) of a
  container (`sleep`), with the hook publishing one TCP port against the same container with
  `dd of=/dev/null` as its prestart and poststop hook (infra.BASELINE_HOOK: it reads the state,
  as every hook must; /bin/true before 2026-11-29); interleaved, the order turned each run, runs
  medians [min–max]; the added cost is median(hook) − median(baseline). The hook twice: the venv's
  console script (what the tests run; pip's wrapper imports re) and the script the packages
  install in hooks.d (python3 -IS), both on the venv's interpreter. --gap: quiet after each
  delete (what it leaves to the kernel lands on no start); --hold: time between a start and its
  delete (0, the default: at once, while the forwarding still starts its core).
- memory: N containers forwarded at once (runc); the sum of smaps_rollup Pss of every process
  the hook left running (each supervisor and all its descendants) 1 s after the last start,
  divided by N. The same for pasta (one per container, as podman runs it: one port each) and
  rootlesskit (one process tree serves every container of a user, as rootless docker runs it:
  one port per container added with rootlessctl).
As root; measurement only, nothing is asserted. Everything made is removed on exit.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests" / "e2e"))

from e2ekit.container import ContainerFactory  # noqa: E402
from e2ekit.hookenv import HookEnv, reap_leftovers  # noqa: E402
from e2ekit.rootfs import build_rootfs  # noqa: E402
from e2ekit.runtimes import make_runtime  # noqa: E402
from infra import (  # noqa: E402
    BASELINE_HOOK,
    BASELINE_HOOK_ARGS,
    BASELINE_LABEL,
    Cleanup,
    Netns,
    free_port,
    pss_kib,
    run,
    run_timed,
    start,
    tree,
    wait_for,
    work_dir,
)
from report import CONTAINER_COST_BEGIN, CONTAINER_COST_END, put_section  # noqa: E402

SLEEP = ["sleep", "3600"]
RUNTIME_TIMEOUT = 60
WRAPPER = """#!/bin/sh
PYTHONPATH={src} exec {python} -I -c 'import sys; sys.path.insert(0, "{src}"); from oci_portfwd.cli import main; sys.exit(main())' "$@"
"""
INNER_PORT = 81


LIBEXEC = Path("packaging") / "libexec" / "oci-portfwd-hook"


def hooksd_script(hook_dir: Path, work: Path, name: str) -> HookEnv:
    """The hooks.d script of the tree that holds hook_dir, on this venv's interpreter."""
    shebang, body = (hook_dir.parent / LIBEXEC).read_text().split("\n", 1)
    options = shebang.split(" ", 1)[1] if " " in shebang else ""
    # As installed: Debian's dependencies (the site dirs of /usr, which -S leaves sys.prefix
    # at), and the native programs where `make venv` built them (the packages put them in
    # /usr/libexec/oci-portfwd-hook, which the hook finds from sys.prefix).
    main_import = "from oci_portfwd.cli import main"
    body = body.replace(main_import, f"sys.prefix = {str(REPO / '.venv')!r}\n{main_import}", 1)
    script = work / f"{name}-script"
    script.write_text(f"#!{REPO / '.venv' / 'bin' / 'python3'} {options}\n"
                      f"import sys; sys.path.insert(0, {str(hook_dir)!r})\n{body}")
    script.chmod(0o755)
    return HookEnv(script, work / name, settings={"log_level": "info"})


def timed(argv: list[str], out: Path) -> float:
    """Wall time of a command in ms (infra.run_timed: a pidfd, not subprocess's polling wait)."""
    with open(out, "wb") as f:
        code, seconds = run_timed(argv, f, RUNTIME_TIMEOUT)
    if code != 0:
        raise RuntimeError(f"{' '.join(argv)} -> {code}: {out.read_text(errors='replace')[-2000:]}")
    return seconds * 1000


def start_delete(factory: dict, hooks: dict, runs: int, ports: set[int], gap: float, hold: float) -> dict:
    out: dict = {}
    names = list(hooks)
    for i in range(runs):
        # The order turns each run: a start right after one of our deletes shares the CPUs
        # with that teardown (supervisor, core and dialer exiting, the netns going).
        order = names[i % len(names):] + names[:i % len(names)]
        for rt_name, f in factory.items():
            for variant in order:
                hook = hooks[variant]
                cell = out.setdefault(rt_name, {}).setdefault(variant, {"start_ms": [], "delete_ms": []})
                c = f.new(SLEEP, hook=hook, ports=f"127.0.0.1:{free_port(ports)}:{INNER_PORT}")
                c._created = True  # noqa: SLF001 - the factory's cleanup deletes it on failure
                rt = c.runtime
                cell["start_ms"].append(timed(rt.create_argv(
                    "run", "-d", "--bundle", str(c.bundle), "--pid-file", str(c.bundle / "pid"), c.id),
                    c.bundle / "run.out"))
                # delete -f of the running container: the runtime kills it, then runs poststop.
                # Right after the start (hold 0), the delete meets the forwarding still starting
                # its core on the same CPUs; with a hold, a forwarding that has settled.
                time.sleep(hold)
                cell["delete_ms"].append(timed(rt.argv("delete", "-f", c.id), c.bundle / "delete.out"))
                c._created = False  # noqa: SLF001 - deleted
                # What a delete leaves to the kernel (the netns going, exits reaped) must not
                # land on the next start: without a gap, crun's second variant of a turn
                # measured 5-9 ms more than its first with the same hook in both (A/A).
                time.sleep(gap)
    return out


def hook_pss(factory: ContainerFactory, hook: HookEnv, count: int, ports: set[int], settle: float) -> dict:
    made = []
    try:
        for _ in range(count):
            c = factory.new(SLEEP, hook=hook, ports=f"127.0.0.1:{free_port(ports)}:{INNER_PORT}")
            c.start()
            made.append(c)
        time.sleep(settle)
        total, procs = 0, 0
        by_comm: dict[str, int] = {}
        for c in made:
            sup = int(hook.read_state(c.id)["supervisor_pid"])
            for p in tree(sup):
                pss = pss_kib(p.pid)
                total += pss
                procs += 1
                # supervisor ("portfwd:<id>"), core, dialer: which process costs what
                comm = "portfwd:<id>" if p.comm().startswith("portfwd:") else p.comm()
                by_comm[comm] = by_comm.get(comm, 0) + pss
        return {"pss_kib_per_container": total / count, "processes": procs,
                "pss_kib_per_process": {k: v / count for k, v in sorted(by_comm.items())}}
    finally:
        for c in made:
            c.stop()


def pasta_pss(cleanup: Cleanup, work: Path, count: int, ports: set[int], settle: float) -> dict:
    own = Cleanup()
    token = cleanup.push("pasta instances", own.run_all)
    try:
        pids = []
        for i in range(count):
            ns = Netns(own, _NoLog(), f"pasta{i}")
            port = free_port(ports)
            proc = start(own, ["pasta", "-f", "--runas", "0", "--netns", ns.path,
                               "-t", f"127.0.0.1/{port}:{INNER_PORT}", "-T", "none", "-U", "none",
                               "-u", "none"], work / f"pasta{i}.log", "pasta")
            pids.append(proc.pid)
            wait_for(lambda port=port: _listening_on(port), 10, f"pasta on {port}")
        time.sleep(settle)
        total = sum(pss_kib(p.pid) for pid in pids for p in tree(pid))
        return {"pss_kib_per_container": total / count}
    finally:
        cleanup.pop(token)


def rootlesskit_pss(cleanup: Cleanup, work: Path, count: int, ports: set[int], settle: float) -> dict:
    from run import ensure_bench_user, private_tun_node  # noqa: PLC0415

    own = Cleanup()
    token = cleanup.push("rootlesskit", own.run_all)
    try:
        user = ensure_bench_user(cleanup)
        tun = work / "priv" / "tun"
        if not tun.exists():
            tun = private_tun_node(work)
        state = work / f"rk{count}"
        state.mkdir(mode=0o700)
        os.chown(state, user.uid, user.gid)
        as_user = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups",
                   "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", f"HOME={user.home}"]
        argv = ["unshare", "-m", "--propagation", "slave", "sh", "-c",
                'mount --bind "$1" /dev/net/tun && shift && exec "$@"', "sh", str(tun), *as_user,
                "rootlesskit", "--net=slirp4netns", "--port-driver=builtin", "--disable-host-loopback",
                "--state-dir", str(state / "st"), *SLEEP]
        proc = start(own, argv, work / f"rk{count}.log", "rootlesskit", cwd="/")
        api = state / "st" / "api.sock"
        wait_for(api.exists, 20, "rootlesskit's API socket")
        for _ in range(count):
            port = free_port(ports)
            run(["rootlessctl", "--socket", str(api), "add-ports", f"127.0.0.1:{port}:{INNER_PORT}/tcp"])
        time.sleep(settle)
        procs = [p for p in tree(proc.pid) if p.comm() not in ("sleep", "unshare", "sh", "setpriv")]
        total = sum(pss_kib(p.pid) for p in procs)
        return {"pss_kib_per_container": total / count, "processes": len(procs)}
    finally:
        cleanup.pop(token)


class _NoLog:
    def note(self, key: str, argv: list[str] | str) -> None:
        pass


def _listening_on(port: int) -> bool:
    needle = f":{port:04X} "
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[1].endswith(needle.strip()):
                return True
    return False


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} [{min(values):.1f}–{max(values):.1f}]"


def added(hook: list[float], baseline: list[float]) -> str:
    """median(hook) − median(baseline), and in brackets the median of each turn's difference
    (the two ran in the same turn, seconds apart). crun's deletes fall in two modes ~10 ms
    apart, the baseline's as ours, and a median of a few runs lands in either: the first figure
    moved by that step from run to run (+3.5 to +17.6 with the same code), the second pairs
    runs that shared the machine's state."""
    turns = statistics.median([h - b for h, b in zip(hook, baseline, strict=True)])
    return f"**{statistics.median(hook) - statistics.median(baseline):+.1f}** ({turns:+.1f})"


def render(results: dict) -> str:
    baseline = results.get("baseline", "/bin/true")  # what runs before 2026-11-29 had
    lines = [f"| runtime | start, {baseline} hook ms | start, oci-portfwd-hook ms | added (turns) | "
             f"delete, {baseline} hook ms | delete, oci-portfwd-hook ms | added (turns) |",
             "|---|---|---|---|---|---|---|"]
    for rt, cells in results["start_delete"].items():
        t = cells[baseline]
        for variant, h in cells.items():
            if variant == baseline:
                continue
            add_s, add_d = (added(h[k], t[k]) for k in ("start_ms", "delete_ms"))
            label = f"{rt}, {'the venv console script' if variant == 'oci-portfwd-hook' else variant}"
            lines.append(f"| {label} | {summary(t['start_ms'])} | {summary(h['start_ms'])} | {add_s} | "
                         f"{summary(t['delete_ms'])} | {summary(h['delete_ms'])} | {add_d} |")
    lines += ["", "| per container, PSS MB (MiB) | " + " | ".join(f"{n} container{'s' * (n > 1)}"
                                                         for n in results["counts"]) + " |",
              "|---|" + "---|" * len(results["counts"])]
    for who, label in (("ours", "oci-portfwd-hook (builtin; supervisor + core + dialer), the venv console script"),
                       ("ours-hooksd", "oci-portfwd-hook, the hooks.d script (Debian's python3-seccomp and python3-prctl, as the packages run it)"),
                       ("pasta", "pasta (one per container)"),
                       ("rootlesskit", "rootlesskit --port-driver=builtin (one for all)")):
        cells = []
        for n in results["counts"]:
            got = results["memory"].get(who, {}).get(str(n))
            if not got or "error" in got:
                cells.append("—" if not got else f"error: {got['error'][:60]}")
            else:
                kib = got["pss_kib_per_container"]
                cells.append(f"{kib * 1024 / 1e6:.1f} ({kib / 1024:.1f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--runtimes", default="crun,runc")
    ap.add_argument("--counts", default="1,30")
    ap.add_argument("--settle", type=float, default=1.0)
    ap.add_argument("--gap", type=float, default=0.2,
                    help="seconds of quiet after each delete, before the next start")
    ap.add_argument("--hold", type=float, default=0.0,
                    help="seconds between a start and its delete (0: at once, the worst case)")
    ap.add_argument("--hook", type=Path, default=REPO / ".venv" / "bin" / "oci-portfwd-hook")
    ap.add_argument("--out", type=Path, default=HERE / "container_cost.json")
    ap.add_argument("--render", action="store_true",
                    help="measure nothing: write the section again from --out's figures")
    ap.add_argument("--results-md", default=str(HERE / "RESULTS.md"),
                    help="the section goes there (empty: nowhere)")
    ap.add_argument("--compare", type=Path, metavar="DIR",
                    help="also time the hook package in DIR (e.g. another checkout's hook/), and "
                         "this tree's, each through its tree's hooks.d script (packaging/libexec, "
                         "else a shell wrapper) on this venv's interpreter (start/delete only)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("container_cost: run as root", file=sys.stderr)
        return 2
    if args.render:
        results = json.loads(args.out.read_text())
        table = render(results)
        print(table)
        if args.results_md:
            update_results_md(Path(args.results_md), results, table)
        return 0
    counts = [int(n) for n in args.counts.split(",") if n]
    cleanup = Cleanup()
    work = work_dir(cleanup, "container-cost-")
    ports: set[int] = set()
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "runs": args.runs, "counts": counts,
                     "gap": args.gap, "hold": args.hold,
                     "load_before": os.getloadavg(), "start_delete": {}, "memory": {}}
    if args.compare:
        args.results_md = None  # a comparison is not the bench's figure
    results["baseline"] = BASELINE_LABEL
    hooks = {BASELINE_LABEL: HookEnv(Path(BASELINE_HOOK), work / "baseline", args=BASELINE_HOOK_ARGS),
             "oci-portfwd-hook": HookEnv(args.hook, work / "hook", settings={"log_level": "info"})}
    # What the packages install in hooks.d (packaging/libexec, no console-script wrapper), with
    # its own interpreter options, run by this venv's interpreter, with the tree's hook/ first
    # on sys.path (the venv's site dir has oci_portfwd only through the editable install's .pth
    # file, which -S skips).
    if not args.compare:
        hooks["hooks.d script"] = hooksd_script(REPO / "hook", work, "hooksd")
    else:
        for name, src in (("this tree's hooks.d script", REPO / "hook"),
                          (f"{args.compare}'s hooks.d script", args.compare)):
            if (Path(src).resolve().parent / LIBEXEC).exists():
                hooks[name] = hooksd_script(Path(src).resolve(), work, f"hook-{len(hooks)}")
            else:
                wrapper = work / f"hook-{len(hooks)}"
                wrapper.write_text(WRAPPER.format(src=Path(src).resolve(), python=Path(sys.executable)))
                wrapper.chmod(0o755)
                hooks[f"{src} (wrapper)"] = HookEnv(wrapper, work / f"hook-{len(hooks)}-state",
                                                    settings={"log_level": "info"})
    factories = {}
    try:
        rootfs = build_rootfs(work / "rootfs", REPO / "tests" / "e2e" / "servers.py")
        for name in args.runtimes.split(","):
            factories[name] = ContainerFactory(make_runtime(name, work / name), rootfs, work / f"bundles-{name}")
            cleanup.push(f"{name} containers", factories[name].cleanup)
        results["start_delete"] = start_delete(factories, hooks, args.runs, ports, args.gap, args.hold)
        f = factories.get("runc") or next(iter(factories.values()))
        if args.compare:
            counts = []
        for who, fn in (("ours", lambda n: hook_pss(f, hooks["oci-portfwd-hook"], n, ports, args.settle)),
                        ("ours-hooksd", lambda n: hook_pss(f, hooks["hooks.d script"], n, ports, args.settle)),
                        ("pasta", lambda n: pasta_pss(cleanup, work, n, ports, args.settle)),
                        ("rootlesskit", lambda n: rootlesskit_pss(cleanup, work, n, ports, args.settle))):
            for n in counts:
                try:
                    results["memory"].setdefault(who, {})[str(n)] = fn(n)
                except Exception as e:  # noqa: BLE001 - one peer failing is a result
                    results["memory"].setdefault(who, {})[str(n)] = {"error": f"{type(e).__name__}: {e}"}
    finally:
        reap_leftovers(hooks["oci-portfwd-hook"])
        cleanup.run_all()
    results["load_after"] = os.getloadavg()
    args.out.write_text(json.dumps(results, indent=1))
    table = render(results)
    print(table)
    if args.results_md:
        update_results_md(Path(args.results_md), results, table)
    return 0


def update_results_md(path: Path, results: dict, table: str) -> None:
    """Its section of RESULTS.md (after bench/run.py's)."""
    prose = (
        f"`bench/container_cost.py` on {results['date']}: {results['runs']} interleaved runs per runtime of "
        "`RUNTIME run -d` and `RUNTIME delete -f` (poststop runs in the delete) of a container with one "
        f"published TCP port, against the same container with `{results.get('baseline', '/bin/true')}` "
        "as its prestart and poststop hook; medians [min–max] in ms, timed with a pidfd; added: the "
        "difference of the medians, and in brackets the median of each turn's difference (the two "
        "seconds apart: crun's deletes fall in two modes ~10 ms apart, baseline and hook alike). "
        "Targets: start ≤ +25 ms, delete ≤ +15 ms. "
        "Memory: N containers at once (runc), Pss (smaps_rollup) of every process the hook left running "
        "(each supervisor with all its descendants) ÷ N, target ≤ 8 MB; pasta as podman runs it (one per "
        "container), rootlesskit as rootless docker runs it (one for all containers of a user, one port "
        "each added with rootlessctl).")
    put_section(path, CONTAINER_COST_BEGIN, CONTAINER_COST_END, "What each container pays (issue 12)", prose,
                table, results)


if __name__ == "__main__":
    sys.exit(main())
