"""SocketPool's two consumers of the dialer's replies: its own pool (socket objects, one per
connection) and batches for the relay threads (descriptors, all of a reply to one callback).
The dialer answers each request once, in order; a real socketpair and a stand-in dialer that
makes real sockets (the protocol of dialer.py) check that each reply reaches its asker."""

from __future__ import annotations

import os
import socket

from oci_portfwd.dialer import SocketPool
from oci_portfwd.fdpass import send_fds


def serve_requests(dialer: socket.socket) -> list[bytes]:
    """Answer every request waiting, in order, as the dialer does; the requests seen."""
    seen = []
    dialer.setblocking(False)
    while True:
        try:
            request = dialer.recv(64)
        except BlockingIOError:
            return seen
        seen.append(request)
        kind, _, count = request.partition(b" ")
        family = socket.AF_INET if kind == b"t4" else socket.AF_INET6
        made = [socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK) for _ in range(int(count))]
        send_fds(dialer, [b"S" + kind], [s.fileno() for s in made])
        for s in made:
            s.close()


def new_pool() -> tuple[SocketPool, socket.socket]:
    core, dialer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    core.setblocking(False)
    pool = SocketPool(core, on_hello=lambda _h: None, on_error=lambda _m: None)
    return pool, dialer


def test_batches_and_the_pool_each_get_their_own_replies() -> None:
    pool, dialer = new_pool()
    got: list[socket.socket | None] = []
    batches: list[list[int] | None] = []
    pool.get(b"t4", got.append)  # the pool asks for TARGET and one for this waiter
    pool.get_batch(b"t4", 5, batches.append)
    pool.get_batch(b"t6", 3, batches.append)
    pool.get_batch(b"t4", 7, batches.append)
    assert serve_requests(dialer) == [b"t4 17", b"t4 5", b"t6 3", b"t4 7"]
    assert pool.on_readable()
    assert len(got) == 1 and got[0] is not None and got[0].family == socket.AF_INET
    assert [len(b) if b else b for b in batches] == [5, 3, 7]
    assert len(pool.ready[b"t4"]) == 16 and pool.pending[b"t4"] == 0  # the batches are not the pool's
    assert batches[1] is not None
    for fd in batches[1]:
        assert socket.socket(fileno=os.dup(fd)).family == socket.AF_INET6
    for batch in batches:
        for fd in batch or []:
            os.close(fd)
    got[0].close()
    pool.close()
    dialer.close()


def test_a_batch_asked_for_when_the_dialer_is_gone_is_told_so() -> None:
    pool, dialer = new_pool()
    batches: list[list[int] | None] = []
    pool.get_batch(b"t4", 4, batches.append)  # asked, never answered
    dialer.close()
    assert not pool.on_readable()  # the dialer is gone
    assert batches == [None]
    pool.get_batch(b"t4", 4, batches.append)
    assert batches == [None, None]
    pool.close()
