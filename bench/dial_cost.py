"""What the source-address setting costs a new connection in the kernel (docs/data-path.md):
the dial the core makes for one connection, repeated in a netns of its own, in three ways.

    .venv/bin/python bench/dial_cost.py [--connections 20000] [--passes 3]

  plain   socket, SO_LINGER, connect to a listener on 127.0.0.1 (source_address loopback)
  bind    + SO_REUSEADDR and a bind to 127.0.0.1 and a port of our choosing, as the core
          binds a socket to its client's address and port
  marked  + IP_TRANSPARENT and SO_MARK, as the dialer makes every socket of that setting

each with and without client_routing.py's rule (`fwmark MARK lookup TABLE`, a `local` default
route in TABLE, tcp_fwmark_accept), which every route lookup in the netns then walks. Each
connection is accepted and both ends closed, in one thread, so µs per connection is the CPU of
a connect and its handshake, an accept and two closes. As root; measurement only, the netns is
deleted on the way out.
"""

import argparse
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "hook"))

from oci_portfwd.client_routing import IP_TRANSPARENT, MARK, TABLE  # noqa: E402

MODES = ("plain", "bind", "marked")

# Run inside the netns by this file's interpreter: the loop, and nothing else in the process.
LOOP = """
import _socket, struct, sys, time
mode, n, transparent, mark = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
linger = struct.pack("ii", 1, 0)
server = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
server.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", 8000))
server.listen(4096)
start = time.perf_counter()
for i in range(n):
    s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM | _socket.SOCK_NONBLOCK)
    s.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, linger)
    if mode != "plain":
        s.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        if mode == "marked":
            s.setsockopt(_socket.IPPROTO_IP, transparent, 1)
            s.setsockopt(_socket.SOL_SOCKET, _socket.SO_MARK, mark)
        s.bind(("127.0.0.1", 20000 + i % 30000))
    s.connect_ex(("127.0.0.1", 8000))
    fd, _ = server._accept()
    c = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM, 0, fd)
    c.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, linger)
    s.close()
    c.close()
print((time.perf_counter() - start) / n * 1e6)
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


def one_pass(netns: str, connections: int) -> dict[str, float]:
    out = {}
    for mode in MODES:
        run = subprocess.run(
            ["ip", "netns", "exec", netns, sys.executable, "-I", "-c", LOOP, mode, str(connections),
             str(IP_TRANSPARENT), str(MARK)],
            check=True, capture_output=True, text=True,
        )
        out[mode] = float(run.stdout)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=20000)
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (a netns of its own)")
    results: dict[str, dict[str, list[float]]] = {"no rule": {m: [] for m in MODES}, "rule": {m: [] for m in MODES}}
    for rules in results:
        netns = f"portfwd-dialcost-{os.getpid()}"
        ip("netns", "add", netns)
        try:
            ip("-n", netns, "link", "set", "lo", "up")
            if rules == "rule":
                ip("-n", netns, "route", "add", "local", "default", "dev", "lo", "table", str(TABLE))
                ip("-n", netns, "rule", "add", "fwmark", hex(MARK), "lookup", str(TABLE), "priority", "97")
                subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw", "net.ipv4.tcp_fwmark_accept=1"],
                               check=True)
            for _ in range(args.passes):  # modes interleaved within a pass
                for mode, us in one_pass(netns, args.connections).items():
                    results[rules][mode].append(us)
        finally:
            ip("netns", "del", netns)
    base = statistics.median(results["no rule"]["plain"])
    print(f"µs per connection (median of {args.passes} passes of {args.connections:,}), and against plain without the rule")
    for rules, modes in results.items():
        for mode, values in modes.items():
            m = statistics.median(values)
            print(f"  {rules:8} {mode:7} {m:6.1f}  {m - base:+5.1f}  [{min(values):.1f}–{max(values):.1f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
