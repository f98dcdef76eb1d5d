"""A relay that dies must not look like a clean end, under crun and runc (rootful; the core's
death also rootless).

- The core, or the supervisor, SIGKILLed during a download without a length and an upload:
  the host client gets a reset (not EOF) and the service in the container sees a reset (not
  EOF) on the upload; what the service saw comes from netserver's `report`, asked inside the
  container's netns (the forwarding may be gone).
- An orderly end is still FIN after every byte: a download whose reader lags behind (the relay
  closes with bytes still in its send buffer), a half-close each way (sha256), and a reply the
  service completed before its container exited, the client's side still open (the teardown
  kills the core: the complete way to the client is delivered whole, not reset).
- Connections queued in the listeners' backlog while the core is stopped are served by the
  restarted core (the supervisor holds the listeners).
- Traffic counters survive a core restart: the state file's figures after three SIGKILLs are
  the bytes the client exchanged, short of at most the one splice each way that the kill
  interrupted.
"""

import hashlib
import os
import signal
import socket
import subprocess
import threading
import uuid

import pytest
from e2ekit.clients import read_exactly
from e2ekit.forwarding import CORE, child_by_comm, forwarding_of, wait_dead
from e2ekit.netservice import NetServices
from e2ekit.procs import Proc
from e2ekit.wait import wait_until
from netserver import stream

ECHO, EVENTS = 7, 8
TIMEOUT = 20
IN_FLIGHT = 4 << 20  # bytes each way before the kill: the transfer is well under way
SPLICE_MAX = 1 << 20  # tcp_relay.CHUNK: the most one splice moves


def serve(containers, hook_env, port_alloc):
    echo, events = port_alloc.take(), port_alloc.take()
    services = NetServices().echo(ECHO).events(EVENTS)
    c = containers.new(services.argv(), hook=hook_env, ports=f"{echo}:{ECHO},{events}:{EVENTS}")
    services.wait_ready(c.start())
    return c, echo, events


def request(port: int, line: str, host: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection((host, port), timeout=TIMEOUT)
    sock.sendall(line.encode() + b"\n")
    return sock


def read_to_eof(sock: socket.socket) -> bytes:
    parts = []
    while data := sock.recv(1 << 16):
        parts.append(data)
    return b"".join(parts)


def end_of_download(sock: socket.socket) -> str:
    """Read on until the connection ends: "reset", "eof" (a truncation that looks complete)
    or "timeout" (hung)."""
    try:
        while sock.recv(1 << 20):
            pass
        return "eof"
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "timeout"


class Upload:
    """Sends to the service's `watch` until the connection fails; remembers how it failed."""

    def __init__(self, port: int, token: str) -> None:
        self.sock = request(port, f"{token} watch")
        assert read_exactly(self.sock, 3) == b"ok\n"
        self.sent = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        block = bytes(1 << 16)
        try:
            while True:
                self.sock.sendall(block)
                self.sent += len(block)
        except OSError as e:
            self.error = e

    def end(self) -> BaseException | None:
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "the upload still runs: its connection hangs"
        return self.error


def report_in_container(c, token: str) -> str:
    """What the service recorded for `token`, asked from inside the container's netns."""
    code = ("import socket\n"
            f"s = socket.create_connection(('127.0.0.1', {EVENTS}), 15)\n"
            f"s.sendall(b'{token} report\\n')\n"
            "data = b''\n"
            "while chunk := s.recv(4096):\n"
            "    data += chunk\n"
            "print(data.decode().strip())\n")
    r = c.exec_in_netns(["/usr/bin/python3", "-c", code])
    assert r.returncode == 0, r
    return r.stdout.decode().strip()


@pytest.mark.parametrize("victim", ["core", "supervisor"])
def test_relay_killed_mid_transfer_resets_both_sides(containers, hook_env, port_alloc, victim):
    c, _echo, events = serve(containers, hook_env, port_alloc)
    kill_mid_transfer(c, hook_env, events, victim)


def test_rootless_core_killed_mid_transfer_resets_both_sides(rootless_containers, rootless_hook_env,
                                                             port_alloc):
    """The container-side sockets come from a dialer in the container's user namespace."""
    c, _echo, events = serve(rootless_containers, rootless_hook_env, port_alloc)
    kill_mid_transfer(c, rootless_hook_env, events, "core")


def kill_mid_transfer(c, hook_env, events: int, victim: str) -> None:
    fw = forwarding_of(hook_env, c.id)
    down_token, up_token = uuid.uuid4().hex, uuid.uuid4().hex

    download = request(events, f"{down_token} stream")
    upload = Upload(events, up_token)
    try:
        read_exactly(download, IN_FLIGHT)
        wait_until(lambda: upload.sent >= IN_FLIGHT or upload.error, TIMEOUT, "the upload under way")
        assert upload.error is None, upload.error
        os.kill(getattr(fw, victim).pid, signal.SIGKILL)
        download_end = end_of_download(download)
        upload_error = upload.end()
    finally:
        download.close()
        upload.sock.close()

    # The host client: a reset, never a clean end of a body that had no length.
    assert download_end == "reset", f"download through a killed {victim} ended with {download_end}"
    assert isinstance(upload_error, (ConnectionResetError, BrokenPipeError)), upload_error
    # The service: the upload it was reading ends in a reset, not in an EOF that looks complete;
    # the stream it was writing fails.
    up_seen = report_in_container(c, up_token)
    assert up_seen.startswith("reset "), f"the service saw the upload end with {up_seen!r}"
    down_seen = report_in_container(c, down_token)
    assert down_seen.startswith("reset "), f"the service saw the download end with {down_seen!r}"
    if victim == "supervisor":
        wait_dead(list(fw.procs.values()), 5)


def test_orderly_end_is_fin_after_every_byte_even_for_a_lagging_reader(containers, hook_env,
                                                                        port_alloc):
    """The relay closes the connection (both ways ended) while its send buffer to the client
    still holds most of the reply (the client has not read it): the crash-time reset must be
    off by then, or those bytes are dropped and the client reset."""
    c, _echo, events = serve(containers, hook_env, port_alloc)
    fw = forwarding_of(hook_env, c.id)
    size, seed = 1 << 20, 4242
    sock = lagging_download(events, size, seed)
    try:
        sock.shutdown(socket.SHUT_WR)

        def closed_by_the_relay() -> bool:
            stats = hook_env.read_stats(c.id)
            return stats["tcp_total"] == 1 and stats["tcp_open"] == 0

        wait_until(closed_by_the_relay, TIMEOUT, "the relay to close the connection")
        assert relay_sent_fin(events, sock.getsockname()[1]), "the relay's bytes were not waiting"
        data = read_to_eof(sock)
    finally:
        sock.close()
    assert len(data) == size and data == stream(size, seed)
    assert fw.core.alive()


def test_a_reply_complete_before_the_container_exits_reaches_the_client_whole(containers, hook_env,
                                                                               port_alloc):
    """The service sends its reply, shuts its side down and the container exits while the client
    (its own side still open) lags behind: the teardown kills the core with the connection open
    and most of the reply still in the relay's send buffer. The way to the client was complete
    (FIN queued after the last byte), so the kernel delivers it: every byte, then EOF."""
    c, _echo, events = serve(containers, hook_env, port_alloc)
    fw = forwarding_of(hook_env, c.id)
    size, seed = 1 << 20, 99
    sock = lagging_download(events, size, seed)
    try:
        client_port = sock.getsockname()[1]
        wait_until(lambda: relay_sent_fin(events, client_port), TIMEOUT,
                   "the relay to queue its FIN after the whole reply")
        request(events, "x exit").close()
        wait_dead(list(fw.procs.values()), TIMEOUT)  # the supervisor saw the exit and tore down
        data = read_to_eof(sock)
    finally:
        sock.close()
    assert len(data) == size and data == stream(size, seed)


def lagging_download(port: int, size: int, seed: int) -> socket.socket:
    """A client that asks for `size` bytes with a small receive buffer and reads nothing yet:
    most of the reply stays in the relay's send buffer."""
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        sock.settimeout(TIMEOUT)
        sock.connect(("127.0.0.1", port))
        sock.sendall(f"{uuid.uuid4().hex} send {size} {seed}\n".encode())
    except BaseException:
        sock.close()
        raise
    return sock


def relay_sent_fin(port: int, client_port: int) -> bool:
    """The relay's socket to the client has its FIN queued behind bytes the client has not
    acknowledged: FIN-WAIT-1, or LAST-ACK when the client's FIN came first."""
    r = subprocess.run(["ss", "-Htn", "state", "fin-wait-1", "state", "last-ack", "state", "closing",
                        "sport", "=", f":{port}", "and", "dport", "=", f":{client_port}"],
                       capture_output=True, timeout=10, check=True)
    return bool(r.stdout.strip())


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_half_close_each_way_still_ends_in_fin(containers, hook_env, port_alloc, host):
    c, _echo, events = serve(containers, hook_env, port_alloc)
    # Client first: upload, half-close, the service reports EOF with every byte, we get EOF.
    token = uuid.uuid4().hex
    data = stream(3 << 20, 7)
    with request(events, f"{token} watch", host) as sock:
        assert read_exactly(sock, 3) == b"ok\n"
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == b""
    assert report_in_container(c, token) == f"eof {len(data)} {hashlib.sha256(data).hexdigest()}"
    # Service first: it says bye and shuts its side; we still send, then half-close.
    token = uuid.uuid4().hex
    with request(events, f"{token} halfclose", host) as sock:
        assert read_to_eof(sock) == b"bye\n"
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    assert report_in_container(c, token) == f"eof {len(data)} {hashlib.sha256(data).hexdigest()}"


def test_backlog_queued_while_the_core_dies_is_served_by_the_next(containers, hook_env, port_alloc):
    c, echo, _events = serve(containers, hook_env, port_alloc)
    fw = forwarding_of(hook_env, c.id)
    os.kill(fw.core.pid, signal.SIGSTOP)  # accepts nothing from here: connections queue
    socks = []
    try:
        for i in range(20):
            sock = socket.create_connection(("127.0.0.1" if i % 2 else "::1", echo), timeout=TIMEOUT)
            socks.append(sock)
            sock.sendall(b"queued %d" % i)
            sock.shutdown(socket.SHUT_WR)
        os.kill(fw.core.pid, signal.SIGKILL)
        new_core = wait_until(lambda: child_by_comm(fw.supervisor.pid, CORE, (fw.core.pid,)), TIMEOUT,
                              "a restarted core")
        replies = [read_to_eof(sock) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    assert replies == [b"queued %d" % i for i in range(20)]
    assert new_core.alive()


def test_counters_survive_core_restarts(containers, hook_env, port_alloc):
    """Known amounts through the echo service, the core SIGKILLed after each (three times): the
    state file (what `ps` shows) counts the dead cores' bytes up to their last splice."""
    c, echo, _events = serve(containers, hook_env, port_alloc)
    fw = forwarding_of(hook_env, c.id)
    core, exchanged, connections = fw.core, 0, 0
    block = os.urandom(1 << 18)
    for round_ in range(3):
        with socket.create_connection(("127.0.0.1", echo), timeout=TIMEOUT) as sock:
            connections += 1
            for _ in range(8 + 4 * round_):
                sock.sendall(block)
                assert read_exactly(sock, len(block)) == block
                exchanged += len(block)
            # Every byte went through the core (echoed back), and the connection is open.
            os.kill(core.pid, signal.SIGKILL)
            old = core.pid
            core = wait_until(lambda old=old: child_by_comm(fw.supervisor.pid, CORE, (old,)), TIMEOUT,
                              "a restarted core")
            # The supervisor zeroes tcp_open in the page when it sees the death, before the restart.
            # A core counts after each splice returns: killed between a splice and its count,
            # it loses that splice (at most a pipe's worth) per direction, never more.
            stats = hook_env.read_stats(c.id)
            lost = (round_ + 1) * SPLICE_MAX
            for key in ("bytes_to_container", "bytes_to_client"):
                assert exchanged - lost <= stats[key] <= exchanged, (key, stats, exchanged)
            assert stats["tcp_total"] == connections and stats["tcp_open"] == 0, stats
    ps = hook_env.run("ps")
    assert ps.returncode == 0 and " 0/3 " in ps.stdout.decode(), ps.stdout.decode()
    assert Proc.of(core.pid) is not None
