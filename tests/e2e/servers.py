#!/usr/bin/python3
"""Test services that run inside a container, with the host's /usr/bin/python3 (standard library only).

Usage: servers.py SPEC...   SPEC = KIND:FAMILY:PORTS
  KIND    whoami    TCP: replies "<local address> <local port>\\n" and closes, so a test can see
                    which container address the forwarder dialled
          sink      TCP: reads to EOF, then replies the sha256 hex of what it read (needs the
                    client's half-close to get through)
          source    TCP: reads a line "N\\n", sends pattern(N) and closes its side
          peer      TCP: replies "<peer address> <peer port>\n" and closes: the client the service sees
          udp-echo  UDP: sends every datagram back to its sender
          udp-peer  UDP: answers every datagram with "<peer address> <peer port> " and the datagram
  FAMILY  4 (0.0.0.0 only), 6 (:: with IPV6_V6ONLY), 46 (both, as two sockets),
          dual (one :: socket without IPV6_V6ONLY: IPv4 arrives as ::ffff:a.b.c.d)
  PORTS   N or N-M

The tests import pattern() from here, so both ends agree on the bytes; keep this module free of
side effects at import time.
"""

import hashlib
import socket
import struct
import sys
import threading

CHUNK = 1 << 20


def _base_chunk() -> bytes:
    blocks = []
    digest = b"oci-portfwd"
    for _ in range(CHUNK // 32):
        digest = hashlib.sha256(digest).digest()
        blocks.append(digest)
    return b"".join(blocks)


def pattern(size: int):
    """Yield `size` deterministic bytes in chunks; each MiB carries its index so that a lost,
    repeated or reordered MiB changes the checksum."""
    base = _base_chunk()
    index = 0
    while size > 0:
        chunk = struct.pack(">Q", index) + base[8:]
        yield chunk[:size]
        size -= len(chunk)
        index += 1


def pattern_sha256(size: int) -> str:
    h = hashlib.sha256()
    for chunk in pattern(size):
        h.update(chunk)
    return h.hexdigest()


def _whoami(conn: socket.socket) -> None:
    addr, port = conn.getsockname()[:2]
    conn.sendall(f"{addr} {port}\n".encode())


def _sink(conn: socket.socket) -> None:
    h = hashlib.sha256()
    while data := conn.recv(1 << 16):
        h.update(data)
    conn.sendall(h.hexdigest().encode() + b"\n")


def _source(conn: socket.socket) -> None:
    line = b""
    while not line.endswith(b"\n"):
        data = conn.recv(64)
        if not data:
            return
        line += data
    for chunk in pattern(int(line)):
        conn.sendall(chunk)


def _peer(conn: socket.socket) -> None:
    addr, port = conn.getpeername()[:2]
    conn.sendall(f"{addr} {port}\n".encode())


def _request_reply(conn: socket.socket) -> None:
    """Requests of REQUEST_SIZE bytes, each answered with one byte once it is complete, as a
    database or an RPC server answers a request its client wrote in several parts."""
    while True:
        got = 0
        while got < REQUEST_SIZE:
            data = conn.recv(REQUEST_SIZE - got)
            if not data:
                return
            got += len(data)
        conn.sendall(b"k")


REQUEST_SIZE = 200
TCP_HANDLERS = {"whoami": _whoami, "sink": _sink, "source": _source, "peer": _peer,
                "request-reply": _request_reply}


def _serve_conn(handler, conn: socket.socket) -> None:
    with conn:
        try:
            handler(conn)
            # Close our side, then drain: closing with unread input would turn the end into a reset.
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(1 << 16):
                pass
        except OSError as exc:
            print(f"servers.py: {handler.__name__}: {exc}", file=sys.stderr, flush=True)


def _accept_loop(listener: socket.socket, handler) -> None:
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_serve_conn, args=(handler, conn), daemon=True).start()


def _udp_echo_loop(sock: socket.socket) -> None:
    while True:
        data, peer = sock.recvfrom(65535)
        sock.sendto(data, peer)


def _udp_peer_loop(sock: socket.socket) -> None:
    while True:
        data, peer = sock.recvfrom(65535)
        sock.sendto(f"{peer[0]} {peer[1]} ".encode() + data, peer)


def _bind(family: int, kind: int, port: int, v6only: bool = True) -> socket.socket:
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        # Separate v4 and v6 sockets, so that "IPv6 only" really refuses IPv4.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if v6only else 0)
    sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    if kind == socket.SOCK_STREAM:
        sock.listen(128)
    return sock


def _start(spec: str) -> None:
    kind, family, ports = spec.split(":")
    first, _, last = ports.partition("-")
    families = {"4": [socket.AF_INET], "6": [socket.AF_INET6], "dual": [socket.AF_INET6],
                "46": [socket.AF_INET, socket.AF_INET6]}[family]
    v6only = family != "dual"
    for port in range(int(first), int(last or first) + 1):
        for fam in families:
            if kind in ("udp-echo", "udp-peer"):
                sock = _bind(fam, socket.SOCK_DGRAM, port, v6only)
                target, args = (_udp_echo_loop if kind == "udp-echo" else _udp_peer_loop), (sock,)
            else:
                sock = _bind(fam, socket.SOCK_STREAM, port, v6only)
                target, args = _accept_loop, (sock, TCP_HANDLERS[kind])
            threading.Thread(target=target, args=args, daemon=True).start()


def main(argv: list[str]) -> None:
    for spec in argv:
        _start(spec)
    print("servers.py: serving " + " ".join(argv), file=sys.stderr, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1:])
