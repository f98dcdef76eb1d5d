"""Established TCP pairs handed to a relay thread in C (hook/native/portfwd_relay.c).

    core's loop: accept, dial, PROXY header ─▶ NativeRelay.hand_over(client, upstream)
        both sockets go into one thread's epoll set (threads dealt in turn); the socket
        objects are detached, not closed
    or a listener given to the threads (NativeRelay.listen, thread_accept.py): a thread
        accepts and dials itself from the sockets supply() gave it; what it cannot serve
        comes back to the loop as records (NativeRelay.records)
    the thread: relays both ways until both ends closed (tcp_relay.py's rules)

Why (issue 15, bench/RESULTS.md): through the Python loop a keep-alive request cost the core
~17 µs of CPU, through a thread ~12 (most of it the kernel's), and the threads run beside the
loop and each other: keep-alive 0.99× → 1.16× the best peer, 2 connections 0.70× → 1.06×. The module is an extension built with the native programs
(`make venv`, the packages) and loaded from the same directory; without it, or with
PYTHON_RELAY_ENV set, tcp_relay.py relays as before.
"""

from __future__ import annotations

import fcntl
import os
import struct
import sys
from _socket import AF_INET

TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket
    from types import ModuleType

    from .stats import Counters

# sys.prefix: the venv's for `make venv`, /usr for the packages (next to the native dialer).
# CPython's stable ABI: one file for 3.11 and every later interpreter.
NATIVE_RELAY = sys.prefix + "/libexec/oci-portfwd-hook/portfwd_relay.abi3.so"
# Test switch (like dialer.PYTHON_DIALER_ENV): set, the Python loop relays every byte.
PYTHON_RELAY_ENV = "OCI_PORTFWD_TEST_PYTHON_RELAY"


def load() -> tuple[ModuleType | None, str]:
    """The extension, or None and why the relaying stays in Python."""
    if os.environ.get(PYTHON_RELAY_ENV):
        return None, f"{PYTHON_RELAY_ENV} is set"
    if not os.path.exists(NATIVE_RELAY):
        return None, f"{NATIVE_RELAY} is missing"
    # importlib's machinery, without importlib's package (it is frozen in every process).
    import _imp  # noqa: PLC0415
    from _frozen_importlib import ModuleSpec  # type: ignore[import-not-found]  # noqa: PLC0415

    spec = ModuleSpec("portfwd_relay", None, origin=NATIVE_RELAY)
    try:
        module = _imp.create_dynamic(spec)
    except ImportError as e:  # built for another Python
        return None, f"{NATIVE_RELAY} does not load: {e}"
    return module, ""


# The threads' records to the loop (portfwd_relay.c's struct slow_record).
RECORD = struct.Struct("=iiii")
SLOW_CONNECTION, SLOW_NEED_SOCKETS, SLOW_PAUSED = 0, 1, 2
F_SETPIPE_SZ = 1031
SLOW_PIPE_SIZE = 1 << 20

# More threads than this spend a big host's CPUs on one container's traffic.
MAX_THREADS = 4


def thread_count() -> int:
    """One per CPU this process may run on, at most MAX_THREADS: a pair stays on its thread,
    so two busy connections go as fast as two processes (socat's fork) would take them."""
    return max(1, min(MAX_THREADS, len(os.sched_getaffinity(0))))


class NativeRelay:
    """The core's end of the threads: a pipe each, whose closing ends it (the process's end
    does too), and one pipe any of them reports on when it stops by itself."""

    def __init__(self, module: ModuleType, threads: int) -> None:
        self.module = module
        self.pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(threads)]
        self.ctls: list[int] = []  # of the threads that started
        self.indexes: list[int] = []
        self.next = 0
        self.report, self.report_w = os.pipe2(os.O_CLOEXEC)
        # What the threads give back to the loop from the listeners they accept on (records,
        # see `records`); made with the first such listener. Non-blocking both ends: a
        # thread never waits for the loop (a connection it cannot pass on is reset).
        self.slow: int | None = None
        self.slow_w = -1

    def start(self, counts: Counters, seccomp_bpf: bytes) -> None:
        """Start the threads. `seccomp_bpf`: their allow-list (seccomp_filter.relay_filter()),
        loaded by each thread itself; b"" for none. A thread inherits this thread's
        credentials: start them after they are dropped. OSError: not all started; the pairs
        go only to those that did (none: the caller relays in Python)."""
        error: OSError | None = None
        for r, w in self.pipes:
            try:
                index = self.module.start(r, self.report_w, counts, seccomp_bpf)
            except OSError as e:
                error = e
                os.close(r)
                os.close(w)
            else:
                self.indexes.append(index)
                self.ctls.append(w)
        if not self.ctls:
            os.close(self.report)
            os.close(self.report_w)
        if error is not None:
            raise error

    def hand_over(self, client: _socket.socket, upstream: _socket.socket) -> None:
        """From here a thread owns both sockets: this process's Python side must not use or
        close them (their objects are detached, whatever happens). OSError: the thread could
        not take them (out of memory or epoll watches): both were reset."""
        self.next = (self.next + 1) % len(self.indexes)
        fds = client.detach(), upstream.detach()
        self.module.add(self.indexes[self.next], *fds)

    def listen(self, fd: int, listener_id: int, family: int, address: str, port: int, *, bind_client: bool) -> int:
        """From now on the threads accept on `fd` and dial address:port (the first target)
        from the pool's sockets, bound to the client's address if `bind_client`; what they
        cannot serve comes back as records. Returns the listener's handle (for resume()).
        The loop must no longer watch `fd`. OSError: not given (the loop keeps it)."""
        if self.slow is None:
            self.slow, self.slow_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            try:
                fcntl.fcntl(self.slow_w, F_SETPIPE_SZ, SLOW_PIPE_SIZE)
            except OSError:
                pass  # the default 64 KiB: 4,096 records
        return self.module.listen(fd, listener_id, self.slow_w, family, address, port, bind_client)  # type: ignore[no-any-return]

    def resume(self, handle: int) -> None:
        """A listener the threads paused after an accept error, watched again."""
        self.module.resume(handle)

    def stop_accepting(self) -> None:
        """The threads accept on no listener from now on (the core is ending: what waits in
        the backlogs is the next core's; one accepted now would be reset by this one's end)."""
        self.module.stop_accepting()

    def supply(self, family: int, fds: list[int]) -> None:
        """Container-side TCP sockets (descriptors, as the dialer sent them: non-blocking)
        for the threads' dials; theirs from now on."""
        self.module.supply(0 if family == AF_INET else 1, fds)

    def records(self) -> list[tuple[int, int, int, int]]:
        """What the threads passed to the loop since the last call: (what, a, b, c) with
        what = SLOW_CONNECTION (a: listener id, b: the client's descriptor, c: the errno of
        the dial they tried, 0 for none), SLOW_NEED_SOCKETS (a: 0 IPv4 / 1 IPv6, b: how
        many) or SLOW_PAUSED (a: listener id, b: the accept's errno)."""
        assert self.slow is not None
        out: list[tuple[int, int, int, int]] = []
        while True:
            try:
                data = os.read(self.slow, 4096 * RECORD.size)
            except BlockingIOError:
                return out
            out.extend(RECORD.iter_unpack(data))  # 16-byte writes: never split

    def why_stopped(self) -> str:
        """What a thread said when it stopped (the report descriptor became readable)."""
        data = os.read(self.report, 4)
        if len(data) < 4:
            return "it ended without a word"
        err = int.from_bytes(data, sys.byteorder)
        return os.strerror(err) if err else "the core closed its pipe"


class UdpBatch:
    """The core's one batch of datagrams (hook/native/udp_batch.c): received from a socket
    with one recvmmsg, sent on with one sendmmsg, datagrams of one size in a row as one
    UDP_SEGMENT message. The core's sockets share it: a batch is sent on before the next
    is received (udp_relay.py)."""

    def __init__(self, module: ModuleType) -> None:
        self.module = module
        self.handle = module.udp_batch()

    def receive(self, fd: int, *, by_source: bool) -> list[tuple[tuple[object, ...] | None, int, int, int]]:
        """Up to 64 datagrams, as runs (source, first, count, bytes) of consecutive ones from
        one source (None: by_source false); [] when there is none. OSError: the socket's
        error (ECONNREFUSED: an ICMP refusal of what it sent)."""
        return self.module.udp_receive(self.handle, fd, by_source)  # type: ignore[no-any-return]

    def datagram(self, index: int) -> bytes:
        """A copy of one datagram of the batch, for a datagram that must outlive it."""
        return self.module.udp_datagram(self.handle, index)  # type: ignore[no-any-return]

    def release(self) -> None:
        """Its pages back to the system (up to 4 MiB after large datagrams): for an idle core."""
        self.module.udp_release(self.handle)

    def send(
        self, fd: int, family: int, first: int, count: int, destination: tuple[object, ...], *, segment: bool
    ) -> tuple[int, int, bool]:
        """(sent, errno, segment): how many of the run went (or were dropped on a full
        buffer, as UDP does), why the rest did not (0: none left), and whether UDP_SEGMENT
        still works on this socket."""
        return self.module.udp_send(self.handle, fd, family, first, count, destination, segment)  # type: ignore[no-any-return]
