"""The measurements, run from the host against 127.0.0.1:PORT. Each returns a dict of figures
(None where the tool failed, with the reason in 'error')."""

import json
import re
import socket
import subprocess
import time
from pathlib import Path

from infra import CLK_TCK, Proc, cpu_ticks, rss_kib

HOST = "127.0.0.1"


class CpuMeter:
    """CPU time used by a set of processes over an interval (utime+stime+cutime+cstime),
    as a percentage of one core."""

    def __init__(self, procs_fn) -> None:
        self.procs_fn = procs_fn

    def __enter__(self) -> "CpuMeter":
        self.procs = self.procs_fn() if self.procs_fn else []
        self.t0 = time.monotonic()
        self.c0 = {p: cpu_ticks(p.pid) for p in self.procs}
        self.percent: float | None = None
        return self

    def __exit__(self, *exc) -> None:
        dt = time.monotonic() - self.t0
        # Per-connection children (socat) end with the client's connections: wait until the
        # parent has reaped them, which adds their CPU to its cutime/cstime. Read before
        # that, a child that had just exited counted nowhere (not alive, not yet reaped):
        # one of two rounds of socat's keep-alive test read 0 % CPU.
        deadline = time.monotonic() + 2.0
        while self.procs_fn and time.monotonic() < deadline and any(
                p not in self.c0 for p in self.procs_fn()):
            time.sleep(0.05)
        ticks = sum(max(0, cpu_ticks(p.pid) - c) for p, c in self.c0.items() if p.alive())
        # Processes born during the test (socat's per-connection children) count whole; those
        # that already ended are in their parent's cutime/cstime (counted above).
        if self.procs_fn:
            ticks += sum(cpu_ticks(p.pid) for p in self.procs_fn() if p not in self.c0)
        self.percent = 100.0 * ticks / CLK_TCK / dt if self.procs and dt > 0 else None


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess | str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f}s"


def iperf_argv(port: int, seconds: int, reverse: bool = False, udp: bool = False) -> list[str]:
    argv = ["iperf3", "-c", HOST, "-p", str(port), "-t", str(seconds), "-J",
            "--connect-timeout", "3000"]
    if udp:
        argv += ["-u", "-b", "1G", "-l", "1400"]
    if reverse:
        argv.append("-R")
    return argv


def _iperf(argv: list[str], seconds: int) -> tuple[dict | None, str | None]:
    # UDP: iperf3 waits forever for the server's first reply datagram where a forwarder does
    # not deliver it; a short bound keeps such a run from eating the time budget.
    bound = seconds + (4 if "-u" in argv else 20)
    for attempt in range(3):
        res = _run(argv, timeout=bound)
        if isinstance(res, str):
            return None, res
        try:
            data = json.loads(res.stdout)
        except json.JSONDecodeError:
            data = {"error": (res.stdout + res.stderr).strip()[-300:] or f"exit {res.returncode}"}
        err = data.get("error")
        if err is None:
            return data, None
        if "busy" in err and attempt < 2:
            time.sleep(1)   # the server is still tearing down the previous test
            continue
        return None, err
    return None, "server busy"


def iperf_tcp(port: int, seconds: int, reverse: bool) -> dict:
    data, err = _iperf(iperf_argv(port, seconds, reverse=reverse), seconds)
    if data is None:
        return {"gbps": None, "error": err}
    return {"gbps": data["end"]["sum_received"]["bits_per_second"] / 1e9}


def iperf_udp(port: int, seconds: int) -> dict:
    data, err = _iperf(iperf_argv(port, seconds, udp=True), seconds)
    if data is None:
        return {"mbps": None, "loss_pct": None, "error": err}
    rec = data["end"].get("sum_received") or data["end"]["sum"]
    return {"mbps": rec["bits_per_second"] / 1e6, "loss_pct": rec["lost_percent"]}


def ab_argv(port: int, requests: int, concurrency: int, csv: Path) -> list[str]:
    return ["ab", "-q", "-r", "-s", "5", "-n", str(requests), "-c", str(concurrency),
            "-e", str(csv), f"http://{HOST}:{port}/"]


def ab_close(port: int, requests: int, concurrency: int, csv: Path) -> dict:
    """New connection per request (ab without -k): rate and p99 (from ab's CSV, µs precision)."""
    res = _run(ab_argv(port, requests, concurrency, csv), timeout=180)
    if isinstance(res, str):
        return {"rps": None, "p99_ms": None, "error": res}
    m = re.search(r"Requests per second:\s+([\d.]+)", res.stdout)
    done = re.search(r"Complete requests:\s+(\d+)", res.stdout)
    failed = re.search(r"Failed requests:\s+(\d+)", res.stdout)
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", res.stdout)
    if m is None or done is None:
        return {"rps": None, "p99_ms": None,
                "error": (res.stderr or res.stdout).strip()[-300:] or f"exit {res.returncode}"}
    pcts: dict[int, float] = {}
    try:
        for line in csv.read_text().splitlines()[1:]:
            pct, ms = line.split(",")
            pcts[int(pct)] = float(ms)
    except (OSError, ValueError):
        pass
    # p50 and p90 beside p99: the shape of the distribution (bench/probe.py prints them).
    out = {"rps": float(m.group(1)), "p99_ms": pcts.get(99), "p50_ms": pcts.get(50), "p90_ms": pcts.get(90),
           "completed": int(done.group(1)),
           "failed": int(failed.group(1)) if failed else 0,
           "non2xx": int(non2xx.group(1)) if non2xx else 0}
    if out["failed"] or out["non2xx"] or out["completed"] < requests:
        out["error"] = (f"{out['completed']} completed, {out['failed']} failed, "
                        f"{out['non2xx']} non-2xx of {requests}")
    return out


def wrk_argv(port: int, seconds: int, concurrency: int, close: bool = False) -> list[str]:
    # -t2, but never more threads than connections (wrk refuses that)
    argv = ["wrk", f"-t{min(2, concurrency)}", f"-c{concurrency}", f"-d{seconds}s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    return argv + [f"http://{HOST}:{port}/"]


def wrk(port: int, seconds: int, concurrency: int, close: bool = False) -> dict:
    res = _run(wrk_argv(port, seconds, concurrency, close), timeout=seconds + 30)
    if isinstance(res, str):
        return {"rps": None, "error": res}
    m = re.search(r"Requests/sec:\s+([\d.]+)", res.stdout)
    if m is None:
        return {"rps": None, "error": (res.stderr or res.stdout).strip()[-300:]}
    out = {"rps": float(m.group(1))}
    # The mean latency: with every connection busy, rate × mean latency = the connections
    # served (Little's law); fewer means some waited unserved and the p99 speaks for the rest.
    avg = re.search(r"^\s+Latency\s+([\d.]+)(us|ms|s)\s", res.stdout, re.M)
    if avg:
        out["avg_ms"] = float(avg.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[avg.group(2)]
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", res.stdout, re.M)
    if p99:
        out["p99_ms"] = float(p99.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[p99.group(2)]
    errs = re.search(r"Socket errors: (.*)", res.stdout)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", res.stdout)
    if errs or non2xx:
        out["error"] = "; ".join(x.group(0) for x in (errs, non2xx) if x)
    return out


SPLIT_HEAD = f"GET / HTTP/1.1\r\nHost: {HOST}\r\nUser-Agent: split-request\r\n".encode()
SPLIT_TAIL = b"Accept: */*\r\n\r\n"


def split_requests(port: int, requests: int = 300, pause: float = 0.0005) -> dict:
    """Keep-alive requests written in two parts (the head, `pause`, the rest), as database and
    RPC clients write header and body apart; the client has TCP_NODELAY, as they do. A
    forwarder that holds the second part back until the first is acknowledged (Nagle), by a
    server that delays its ACK while it waits for the rest, adds ~40 ms to each. Median and p99
    of the request times, ms (the pause included: the same for every forwarder)."""
    times = []
    try:
        with socket.create_connection((HOST, port), timeout=5) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(requests):
                started = time.monotonic()
                sock.sendall(SPLIT_HEAD)
                time.sleep(pause)
                sock.sendall(SPLIT_TAIL)
                _read_response(sock)
                times.append((time.monotonic() - started) * 1000)
    except (OSError, ValueError) as e:
        return {"median_ms": None, "error": f"split requests: {e}"}
    times.sort()
    return {"median_ms": times[len(times) // 2], "p99_ms": times[int(len(times) * 0.99) - 1]}


def _read_response(sock: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(4096)
        if not more:
            raise ConnectionError("closed by the forwarder before a response")
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    m = re.search(rb"(?i)content-length:\s*(\d+)", head)
    if m is None:
        raise ValueError("a response without Content-Length")
    left = int(m.group(1)) - len(body)
    while left > 0:
        more = sock.recv(left)
        if not more:
            raise ConnectionError("closed by the forwarder within a response")
        left -= len(more)


def rss_mib(procs: list[Proc]) -> float | None:
    if not procs:
        return None
    return sum(rss_kib(p.pid) for p in procs) / 1024


REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


def hold_connections(port: int, count: int, timeout: float = 30) -> tuple[list[socket.socket], str | None]:
    """Open `count` connections through the forwarder, each with one keep-alive request
    answered (so that every connection really reaches the server), and keep them open; the
    caller closes them. One at a time: a burst would measure the forwarders' accept paths
    (slirp4netns takes ~0.4 s per connection in a burst), not their memory.
    Returns (sockets, error or None)."""
    socks: list[socket.socket] = []
    deadline = time.monotonic() + timeout
    try:
        for _ in range(count):
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(socks)} of {count} connections in {timeout:.0f}s")
            s = socket.create_connection((HOST, port), timeout=5)
            socks.append(s)
            s.sendall(REQUEST)
            _read_response(s)
    except (OSError, ValueError) as exc:
        return socks, f"after {len(socks)} connections: {exc}"
    return socks, None


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        try:
            s.close()
        except OSError:
            pass
