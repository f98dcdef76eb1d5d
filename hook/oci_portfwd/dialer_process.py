"""The dialer's process, forked by the core (dialer.start_dialer): it joins the container's
namespaces, says hello with the container's addresses, sets up client-address routing, drops
to CAP_NET_ADMIN and the allow-list, and then makes sockets on request: in C when the native
dialer is installed (exec_native), else in this module's loop. The protocol is dialer.py's.

A module of its own, imported in the child only: the core keeps none of it (issue 12).
"""

from __future__ import annotations

import _socket
import os
import sys
import time

from .client_routing import MARK, make_transparent
from .congestion_control import set_on as set_congestion_control
from .congestion_control import unpaced_choice
from .dialer import FAMILIES, KINDS, MAX_BATCH
from .errors import ContainerGone, NamespaceError
from .fdpass import send_fds
from .jsontext import to_json
from .listeners import LINGER_RESET
from .namespaces import join_container, same_file
from .netns_setup import bring_loopback_up, container_addresses, loopback_is_up
from .privileges import drop_dialer, keep_net_admin_across_exec
from .procctl import set_dumpable, set_name
from .seccomp_filter import export_native_dialer, sandbox_dialer


def main(
    sock: _socket.socket,
    container_pid: int,
    want_addresses: bool,
    deadline: float,
    client_udp_ports: list[tuple[int, int]] | None,
    native: str | None,
) -> None:
    set_name("portfwd-dialer")
    # Not dumpable: a process in the container's user namespace cannot ptrace or read us.
    set_dumpable(False)
    try:
        def tell_waiting() -> None:
            sock.send(b"W")

        ours = os.stat("/proc/self/ns/net")
        join_container(container_pid, deadline, on_wait=tell_waiting)
        if same_file(os.stat("/proc/self/ns/net"), ours):
            # The hook checks this before anything starts; this is the safety net: a
            # socket made here would dial the core's own listeners, each connection
            # making the next until no descriptor is left.
            raise NamespaceError(
                f"container pid {container_pid} shares the forwarder's network namespace "
                "(host network): refusing to forward into it"
            )
        if not loopback_is_up():
            bring_loopback_up()
        addresses = container_addresses() if want_addresses else {}
        unpaced = unpaced_choice()
    except NamespaceError as e:
        sock.send((b"G" if isinstance(e, ContainerGone) else b"E") + str(e).encode())
        return
    except Exception as e:  # noqa: BLE001 - reported to the core, which logs it
        sock.send(b"E" + f"setting up the container's network namespace failed: {e!r}".encode())
        return
    hello: dict = {"addresses": {str(4 if f == _socket.AF_INET else 6): a for f, a in addresses.items()}}
    if unpaced is not None:
        hello["congestion_control"] = {"default": unpaced[0], "used": unpaced[1]}
    try:
        serve(sock, hello, client_udp_ports, native, unpaced[1] if unpaced else None)
    except (BrokenPipeError, ConnectionResetError):
        # The core is gone (stopped or crashed while we set up): nobody to make sockets for.
        os._exit(0)


def serve(
    sock: _socket.socket,
    hello: dict,
    client_udp_ports: list[tuple[int, int]] | None,
    native: str | None,
    congestion: str | None = None,
) -> None:
    """`congestion`: the algorithm TCP sockets get instead of the netns's default, which paces
    (congestion_control.py), or None."""
    sock.send(b"K" + to_json(hello).encode())
    # After the hello: the container's start does not wait for this (~130 ms, mostly the
    # pyroute2 import); connections do, since no socket leaves before it.
    transparent = _set_up_client_routing(sock, client_udp_ports) if client_udp_ports is not None else {}
    # Least privilege from here on (privileges.py, seccomp_filter.py): CAP_NET_ADMIN only and
    # the allow-list. After the hello, so that the hook need not wait for it: requests queue
    # meanwhile. Whatever else the dialer sets up in the container goes above.
    drop_dialer()
    if native is not None:
        try:
            exec_native(native, sock, transparent, congestion)
        except Exception as e:  # noqa: BLE001 - logged; the Python loop serves instead
            # Found by the core, not runnable here (e.g. a rootless user who may not enter
            # its directory): the loop in Python serves as well.
            reason = e.strerror if isinstance(e, OSError) else repr(e)
            print(
                f"portfwd-dialer pid {os.getpid()}: cannot run {native} ({reason}); "
                "the dialer's loop runs in Python",
                file=sys.stderr,
                flush=True,
            )
            drop_dialer()  # the inheritable and ambient sets again
    sandbox_dialer()
    while True:
        request = sock.recv(64)
        if not request:
            os._exit(0)
        kind, _, count_text = request.partition(b" ")
        family, kind_type = KINDS[kind]
        count = max(1, min(MAX_BATCH, int(count_text or b"1")))
        made = [_socket.socket(family, kind_type | _socket.SOCK_NONBLOCK | _socket.SOCK_CLOEXEC) for _ in range(count)]
        if transparent.get(family):
            try:
                for s in made:
                    make_transparent(s)
            except OSError:
                # Not expected once the routing is set up; the core's bind of such a socket
                # then fails and it dials from loopback.
                transparent[family] = False
        if kind_type == _socket.SOCK_STREAM:
            # Reset, not FIN, if the core dies holding the connection (see tcp_relay):
            # set here, so that it costs the core nothing per connection.
            for s in made:
                s.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, LINGER_RESET)
                # No Nagle in the relay (see listeners._bind_one).
                s.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
                if transparent.get(family):
                    # The core binds it to the client's address and port, which our last
                    # connection from that client may hold in TIME_WAIT: connect() then tells
                    # whether the 4-tuple is free (source_address.SourceBinder.bind).
                    s.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
                if congestion is not None:
                    try:
                        set_congestion_control(s, congestion)
                    except OSError as e:
                        # Set on a socket of this netns at the start: not expected. The
                        # connections still work, paced; said once, as the native loop does.
                        print(
                            f"portfwd-dialer pid {os.getpid()}: TCP sockets keep the netns's congestion "
                            f"control: {congestion} cannot be set ({e.strerror})",
                            file=sys.stderr,
                            flush=True,
                        )
                        congestion = None
        send_fds(sock, [b"S" + kind], [s.fileno() for s in made])
        for s in made:
            s.close()


def exec_native(path: str, sock: _socket.socket, transparent: dict[int, bool], congestion: str | None = None) -> None:
    """Replace this process with the native loop (hook/native/portfwd-dialer.c): same
    protocol, same allow-list's purpose (built here, loaded there), same capabilities."""
    filter_r, filter_w = os.pipe()
    try:
        # The filter is a few hundred bytes: the pipe holds it without a reader.
        export_native_dialer(filter_w)
        os.set_inheritable(filter_r, True)
        os.set_inheritable(sock.fileno(), True)
        keep_net_admin_across_exec()
        families = [str(4 if f == _socket.AF_INET else 6) for f in FAMILIES if transparent.get(f)]
        # Descriptors: 0-2 (/dev/null, the log), the socketpair and the filter; everything
        # else the dialer holds is close-on-exec.
        options = [f"cc={congestion}"] if congestion else []
        os.execv(path, ["portfwd-dialer", str(sock.fileno()), str(filter_r), str(MARK), *families, *options])
    finally:
        os.close(filter_r)


def _set_up_client_routing(sock: _socket.socket, udp_ports: list[tuple[int, int]]) -> dict[int, bool]:
    from .client_routing import set_up  # noqa: PLC0415 - source_address client only

    started = time.monotonic()
    ready, notes = set_up(udp_ports)
    report = {
        "ready": {"4" if f == _socket.AF_INET else "6": ok for f, ok in ready.items()},
        "notes": notes,
        "ms": round((time.monotonic() - started) * 1000),
    }
    routes = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW | _socket.SOCK_CLOEXEC, _socket.NETLINK_ROUTE)
    try:
        send_fds(sock, [b"T" + to_json(report).encode()], [routes.fileno()])
    finally:
        routes.close()
    return ready
