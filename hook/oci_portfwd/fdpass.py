"""Descriptors over a unix socket (SCM_RIGHTS): socket.send_fds and socket.recv_fds on a
`_socket.socket`, without the socket module (its enums and selectors: ~1 MB of every
forwarded container, issue 12) and without array (a C int is 4 bytes in native order).

recv_fds passes `flags` on to recvmsg, which Python 3.11's version forgets to do.
"""

from __future__ import annotations

import sys
from _socket import CMSG_LEN, SCM_RIGHTS, SOL_SOCKET

TYPE_CHECKING = False
if TYPE_CHECKING:
    from _socket import socket

INT_SIZE = 4


def send_fds(sock: socket, buffers: list[bytes], fds: list[int]) -> int:
    data = b"".join(fd.to_bytes(INT_SIZE, sys.byteorder) for fd in fds)
    return sock.sendmsg(buffers, [(SOL_SOCKET, SCM_RIGHTS, data)])


def recv_fds(sock: socket, bufsize: int, maxfds: int, flags: int = 0) -> tuple[bytes, list[int], int, object]:
    """(data, descriptors, msg_flags, address), as socket.recv_fds."""
    msg, ancdata, msg_flags, address = sock.recvmsg(bufsize, CMSG_LEN(maxfds * INT_SIZE), flags)
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == SOL_SOCKET and kind == SCM_RIGHTS:
            fds += memoryview(data[: len(data) - len(data) % INT_SIZE]).cast("i").tolist()
    return msg, fds, msg_flags, address
