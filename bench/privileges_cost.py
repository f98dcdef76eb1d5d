"""What least privilege costs a container (docs/privileges-and-cost.md): the hook's prestart
time inside a real `runc run -d`, and the PSS of supervisor + core + dialer, for two source
trees of the hook run interleaved on the same interpreter (the venv's).

    .venv/bin/python bench/privileges_cost.py --before /tmp/base/hook --after hook --runs 12

--before / --after: directories holding the `oci_portfwd` package. As root; measurement
only, nothing is asserted.
"""

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))

from e2ekit.container import ContainerFactory  # noqa: E402
from e2ekit.forwarding import forwarding_of  # noqa: E402
from e2ekit.hookenv import HookEnv, reap_leftovers  # noqa: E402
from e2ekit.rootfs import build_rootfs  # noqa: E402
from e2ekit.runtimes import make_runtime  # noqa: E402
from e2ekit.services import Services  # noqa: E402

WRAPPER = """#!/bin/sh
t0=$(date +%s%N)
PYTHONPATH={src} {python} -s -c 'import sys; from oci_portfwd.cli import main; sys.exit(main())' "$@"
rc=$?
echo "$1 $(( $(date +%s%N) - t0 ))" >> {times}
exit $rc
"""


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--after", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python"),
                    help="the interpreter (e.g. /usr/bin/python3: Debian's packages)")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds before reading PSS")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="privileges-cost-"))
    runtime = make_runtime("runc", work)
    rootfs = build_rootfs(work / "rootfs", REPO / "tests" / "e2e" / "servers.py")
    results: dict[str, dict[str, list[float]]] = {}
    hooks = {}
    for name, src in (("before", args.before), ("after", args.after)):
        times = work / f"{name}.times"
        wrapper = work / f"hook-{name}"
        wrapper.write_text(WRAPPER.format(src=src.resolve(), python=args.python,
                                          times=times))
        wrapper.chmod(0o755)
        hooks[name] = (HookEnv(wrapper, work / f"state-{name}"), times)
        results[name] = {"prestart_ms": [], "pss_kib": [], "supervisor": [], "core": [], "dialer": []}
    factory = ContainerFactory(runtime, rootfs, work / "bundles")
    port = 29871
    try:
        for _ in range(args.runs):
            for name, (hook, times) in hooks.items():
                services = Services().whoami(81)
                c = factory.new(services.argv(), hook=hook, ports=f"127.0.0.1:{port}:81")
                services.wait_ready(c.start())
                time.sleep(args.settle)
                fwd = forwarding_of(hook, c.id)
                each = {role: pss_kib(p.pid) for role, p in fwd.procs.items()}
                results[name]["pss_kib"].append(sum(each.values()))
                for role, kib in each.items():
                    results[name][role].append(kib)
                c.stop()
                last = [line.split() for line in times.read_text().splitlines() if line.startswith("prestart")][-1]
                results[name]["prestart_ms"].append(int(last[1]) / 1e6)
    finally:
        factory.cleanup()
        for hook, _ in hooks.values():
            reap_leftovers(hook)
        shutil.rmtree(work, ignore_errors=True)
    for name, figures in results.items():
        print(f"{name:7s} prestart median {statistics.median(figures['prestart_ms']):6.1f} ms "
              f"[{min(figures['prestart_ms']):.1f}-{max(figures['prestart_ms']):.1f}]   "
              f"PSS supervisor+core+dialer median {statistics.median(figures['pss_kib']) / 1024:5.1f} MiB "
              f"[{min(figures['pss_kib']) / 1024:.1f}-{max(figures['pss_kib']) / 1024:.1f}]  ("
              + ", ".join(f"{role} {statistics.median(figures[role]) / 1024:.1f}"
                          for role in ("supervisor", "core", "dialer")) + ")")


if __name__ == "__main__":
    main()
