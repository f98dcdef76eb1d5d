#!/usr/bin/python3
"""Servers for the reliability tests, run inside a container with the host's /usr/bin/python3
(standard library only). Passed to `python3 -c` whole, so that no rootfs change is needed.

Usage: netserver.py SPEC...   SPEC = KIND:PORT   (each on 0.0.0.0 and on :: with IPV6_V6ONLY)
  echo    one epoll loop, any number of connections (the load tests hold thousands): sends back
          every byte; on the client's EOF, sends what is left, then shuts its side down
  events  thread per connection; the client's first line is "TOKEN ACTION [ARG]":
            watch            reply "ok\\n", read to the end, record "eof N SHA256" or "reset N"
            halfclose        send "bye\\n" and shut our side down at once, then as watch
            reset            reset the connection (SO_LINGER 0 + close) at once
            send-reset N     send N bytes, wait 0.3 s, then reset
            send N SEED      send stream(N, SEED) in chunks of random sizes, then shut our
                             side down and read to the end
            stream           send without a length (a CGI stream, a log tail) until the
                             connection fails; record "reset N" or "error N ERRNO"
            exit             end the server process at once (the container's init: it exits)
            report           (TOKEN is the one to report on) reply what was recorded for it,
                             waiting up to 10 s for it, then close
  A test sees what the server saw through "report", never through timing.
"""

import errno
import hashlib
import os
import random
import select
import socket
import struct
import sys
import threading
import time

LINGER_RESET = struct.pack("ii", 1, 0)


def _listeners(port: int, backlog: int) -> list[socket.socket]:
    socks = []
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((addr, port))
        sock.listen(backlog)
        socks.append(sock)
    return socks


def stream(size: int, seed: int) -> bytes:
    """The bytes of `send`, which a client computes the same way."""
    return random.Random(seed).randbytes(size)


def chunk_sizes(seed: int):
    """Random chunk sizes, from 1 byte to 256 KiB, mostly small or mid-sized."""
    rng = random.Random(seed ^ 0x5EED)
    while True:
        yield rng.choice((1, rng.randint(1, 100), rng.randint(100, 16384), rng.randint(1, 1 << 18)))


# --- echo: one epoll loop ------------------------------------------------------------------

class _Echo:
    __slots__ = ("sock", "out", "eof")

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.out, self.eof = sock, bytearray(), False


def _echo_loop(port: int) -> None:
    ep = select.epoll()
    listeners = {}
    for sock in _listeners(port, 4096):
        sock.setblocking(False)
        listeners[sock.fileno()] = sock
        ep.register(sock.fileno(), select.EPOLLIN)
    conns: dict[int, _Echo] = {}

    def close(c: _Echo) -> None:
        fd = c.sock.fileno()
        ep.unregister(fd)
        del conns[fd]
        c.sock.close()

    def flush(c: _Echo) -> bool:
        """Send what is pending; False once the connection is gone."""
        while c.out:
            try:
                sent = c.sock.send(c.out)
            except BlockingIOError:
                ep.modify(c.sock.fileno(), select.EPOLLOUT)
                return True
            except OSError:
                close(c)
                return False
            del c.out[:sent]
        if c.eof:
            try:
                c.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            close(c)
            return False
        ep.modify(c.sock.fileno(), select.EPOLLIN)
        return True

    while True:
        for fd, events in ep.poll():
            if fd in listeners:
                while True:
                    try:
                        sock, _ = listeners[fd].accept()
                    except BlockingIOError:
                        break
                    except OSError as e:
                        if e.errno in (errno.EMFILE, errno.ENFILE):
                            print(f"netserver: accept: {e}", file=sys.stderr, flush=True)
                            time.sleep(0.05)
                        break
                    sock.setblocking(False)
                    conns[sock.fileno()] = _Echo(sock)
                    ep.register(sock.fileno(), select.EPOLLIN)
                continue
            c = conns.get(fd)
            if c is None:
                continue
            if events & select.EPOLLOUT:
                flush(c)
                continue
            try:
                data = c.sock.recv(1 << 16)
            except BlockingIOError:
                continue
            except OSError:
                close(c)
                continue
            if not data:
                c.eof = True
            c.out += data
            flush(c)


# --- events: one thread per connection ---------------------------------------------------------

_results: dict[str, str] = {}
_results_cond = threading.Condition()


def _record(token: str, what: str) -> None:
    with _results_cond:
        _results[token] = what
        _results_cond.notify_all()


def _reset(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    conn.close()


def _read_line(conn: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        data = conn.recv(1)
        if not data:
            break
        line += data
    return line


def _watch(conn: socket.socket, token: str) -> None:
    h, n = hashlib.sha256(), 0
    try:
        while data := conn.recv(1 << 16):
            h.update(data)
            n += len(data)
    except ConnectionResetError:
        _record(token, f"reset {n}")
        return
    _record(token, f"eof {n} {h.hexdigest()}")


def _stream(conn: socket.socket, token: str) -> None:
    block, n = bytes(range(256)) * 256, 0
    try:
        while True:
            n += conn.send(block)
    except (ConnectionResetError, BrokenPipeError):
        _record(token, f"reset {n}")
    except OSError as e:
        _record(token, f"error {n} {e.errno}")


def _events_conn(conn: socket.socket) -> None:
    try:
        words = _read_line(conn).decode().split()
        if len(words) < 2:
            conn.close()
            return
        token, action, args = words[0], words[1], words[2:]
        if action == "watch":
            conn.sendall(b"ok\n")
            _watch(conn, token)
        elif action == "halfclose":
            conn.sendall(b"bye\n")
            conn.shutdown(socket.SHUT_WR)
            _watch(conn, token)
        elif action == "reset":
            _reset(conn)
            return
        elif action == "send-reset":
            conn.sendall(b"r" * int(args[0]))
            time.sleep(0.3)
            _reset(conn)
            return
        elif action == "send":
            data, sizes = stream(int(args[0]), int(args[1])), chunk_sizes(int(args[1]))
            view, offset = memoryview(data), 0
            while offset < len(data):
                n = next(sizes)
                conn.sendall(view[offset:offset + n])
                offset += n
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(1 << 16):
                pass
        elif action == "stream":
            _stream(conn, token)
        elif action == "exit":
            os._exit(0)
        elif action == "report":
            with _results_cond:
                _results_cond.wait_for(lambda: token in _results, timeout=10)
                answer = _results.get(token, "none")
            conn.sendall(answer.encode() + b"\n")
        conn.close()
    except OSError as e:
        print(f"netserver: events: {e}", file=sys.stderr, flush=True)
        conn.close()


def _events_accept(sock: socket.socket) -> None:
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=_events_conn, args=(conn,), daemon=True).start()


def main(argv: list[str]) -> None:
    for spec in argv:
        kind, port = spec.split(":")
        if kind == "echo":
            threading.Thread(target=_echo_loop, args=(int(port),), daemon=True).start()
        elif kind == "events":
            for sock in _listeners(int(port), 128):
                threading.Thread(target=_events_accept, args=(sock,), daemon=True).start()
        else:
            raise SystemExit(f"netserver: unknown kind {kind!r}")
    print("netserver: serving " + " ".join(argv), file=sys.stderr, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1:])
