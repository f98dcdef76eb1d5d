"""Clients on the host side of a forwarded port: real tools (curl, socat) where a person would
use them, Python sockets where the test must control every byte (integrity, half-close)."""

import hashlib
import socket
import subprocess

from servers import pattern, pattern_sha256  # noqa: F401  (re-exported for the tests)

CLIENT_TIMEOUT = 5


def url(host: str, port: int, path: str = "/index.html") -> str:
    return f"http://[{host}]:{port}{path}" if ":" in host else f"http://{host}:{port}{path}"


def curl(host: str, port: int, path: str = "/index.html",
         prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    """GET with curl; -g for literal IPv6, no proxy whatever the environment says."""
    argv = ["curl", "-g", "-sS", "--noproxy", "*", "--max-time", str(CLIENT_TIMEOUT),
            url(host, port, path)]
    return subprocess.run([*(prefix or []), *argv], capture_output=True, timeout=30, check=False)


def _connect(host: str, port: int) -> socket.socket:
    return socket.create_connection((host, port), timeout=CLIENT_TIMEOUT)


def read_exactly(sock: socket.socket, n: int) -> bytes:
    """n bytes from a stream, or an assertion error naming how many came before EOF."""
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        assert more, f"EOF after {len(data)} of {n} bytes"
        data += more
    return data


def read_to_eof(sock: socket.socket) -> bytes:
    parts = []
    while data := sock.recv(1 << 16):
        parts.append(data)
    return b"".join(parts)


def whoami(host: str, port: int) -> tuple[str, int]:
    """(address, port) the service in the container was reached on."""
    with _connect(host, port) as sock:
        addr, cport = read_to_eof(sock).decode().split()
    return addr, int(cport)


def connection_refused(host: str, port: int) -> bool:
    try:
        with _connect(host, port):
            return False
    except ConnectionRefusedError:
        return True


def sink_roundtrip(host: str, port: int, size: int) -> str:
    """Send pattern(size), half-close, return the sink's reply (sha256 hex of what it got)."""
    with _connect(host, port) as sock:
        sock.settimeout(60)
        for chunk in pattern(size):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        return read_to_eof(sock).decode().strip()


def source_fetch(host: str, port: int, size: int) -> tuple[int, str]:
    """Ask the source for `size` bytes; return (bytes received, sha256 hex) up to EOF."""
    h, total = hashlib.sha256(), 0
    with _connect(host, port) as sock:
        sock.settimeout(60)
        sock.sendall(f"{size}\n".encode())
        sock.shutdown(socket.SHUT_WR)
        while data := sock.recv(1 << 20):
            h.update(data)
            total += len(data)
    return total, h.hexdigest()


def udp_echo(host: str, port: int, payload: bytes, tries: int = 3) -> bytes | None:
    """Send payload, return the reply (None if nothing came back). Resends because UDP may
    lose a datagram while the forwarder sets up the session."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(CLIENT_TIMEOUT / tries)
        for _ in range(tries):
            sock.sendto(payload, (host, port))
            try:
                data, _ = sock.recvfrom(65535)
                return data
            except TimeoutError:
                continue
    return None


def socat_udp(host: str, port: int, payload: bytes) -> subprocess.CompletedProcess:
    """One datagram through socat, the reply on stdout (-t: wait that long for it)."""
    target = f"UDP6:[{host}]:{port}" if ":" in host else f"UDP4:{host}:{port}"
    return subprocess.run(["socat", "-t", "1", "-T", "3", "-", target], input=payload,
                          capture_output=True, timeout=30, check=False)


def assert_http_ok(host: str, port: int) -> None:
    """curl gets the rootfs' index page whole."""
    from .rootfs import INDEX_HTML

    r = curl(host, port)
    assert r.returncode == 0, f"curl {url(host, port)}: {r.stderr.decode().strip()}"
    assert r.stdout == INDEX_HTML, f"body of {len(r.stdout)} bytes, expected {len(INDEX_HTML)}"


def tcp_peer(source: str, host: str, port: int) -> tuple[str, int, int]:
    """Connect from `source` (port chosen by the kernel) to a `peer` service; returns the address
    and port the service saw, and our own port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(CLIENT_TIMEOUT)
        sock.bind((source, 0))
        sock.connect((host, port))
        own = sock.getsockname()[1]
        addr, seen = read_to_eof(sock).decode().split()
    return addr, int(seen), own


def udp_peer(source: str, host: str, port: int, payload: bytes = b"hi",
             tries: int = 3) -> tuple[str, int, int] | None:
    """One datagram from `source` to a `udp-peer` service; returns the address and port it
    saw, and our own port (None: no answer). The answer must carry our payload back."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(CLIENT_TIMEOUT / tries)
        sock.bind((source, 0))
        for _ in range(tries):
            sock.sendto(payload, (host, port))
            try:
                data = sock.recv(65535)
            except TimeoutError:
                continue
            addr, seen, rest = data.split(b" ", 2)
            assert rest == payload, data
            return addr.decode(), int(seen), sock.getsockname()[1]
    return None
