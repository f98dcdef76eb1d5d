"""The native dialer (hook/native/portfwd-dialer.c) as a program: the binary `make venv` built,
run as the dialer runs it (CAP_NET_ADMIN only, no_new_privs, its end of a SOCK_SEQPACKET
socketpair, the filter exported by seccomp_filter.export_native_dialer through a pipe), on
this host's kernel. The containers' suites (test_forwarding, test_privileges, test_source_address*,
…) run it inside real containers; here what they cannot reach: each socket's options, both
seccomp bindings' export, an error under the filter, the capability check, and a uid that
is not 0 (a rootful container with a user namespace).
"""

import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from oci_portfwd.client_routing import IP_TRANSPARENT, IPV6_TRANSPARENT, MARK
from oci_portfwd.congestion_control import current
from oci_portfwd.dialer import KINDS, MAX_BATCH, NATIVE_DIALER
from oci_portfwd.privileges import drop_dialer, keep_net_admin_across_exec

REPO = Path(__file__).resolve().parents[2]

NET_ADMIN = 1 << 12
SYSTEM_PYTHON = "/usr/bin/python3"
# The filter as each binding exports it: the venv's pyseccomp, Debian's python3-seccomp.
EXPORT = ("import os, sys; from oci_portfwd import seccomp_filter as s; "
          "s.export_native_dialer(os.dup(1)); print(s._library().__name__, file=sys.stderr)")
BINDINGS = {"pyseccomp": sys.executable, "python3-seccomp": SYSTEM_PYTHON}


@pytest.fixture(scope="module")
def native(e2e_host) -> str:
    if not os.access(NATIVE_DIALER, os.X_OK):
        pytest.fail(f"{NATIVE_DIALER} is missing: run `make venv`")
    return NATIVE_DIALER


def exported_filter(binding: str) -> bytes:
    python = BINDINGS[binding]
    r = subprocess.run([python, "-s", "-c", EXPORT], capture_output=True, timeout=30,
                       env={**os.environ, "PYTHONPATH": str(REPO / "hook")})
    if r.returncode != 0 and binding == "python3-seccomp" and b"No module named 'seccomp'" in r.stderr:
        pytest.skip("Debian's python3-seccomp is not installed")
    assert r.returncode == 0, r.stderr.decode()
    # Which module exported it: the binding this case is about.
    assert r.stderr.decode().split() == [{"pyseccomp": "pyseccomp", "python3-seccomp": "seccomp"}[binding]]
    assert r.stdout and len(r.stdout) % 8 == 0
    return r.stdout


class Dialer:
    def __init__(self, native: str, families: tuple[str, ...] = ("4", "6"), *, binding: str = "pyseccomp",
                 prepare=drop_dialer, env: dict | None = None) -> None:
        self.core, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        bpf = exported_filter(binding)
        r, w = os.pipe()
        os.write(w, bpf)
        os.close(w)
        self.proc = subprocess.Popen(
            [native, str(theirs.fileno()), str(r), str(MARK), *families],
            pass_fds=(theirs.fileno(), r), preexec_fn=prepare, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
        os.close(r)
        theirs.close()
        self.core.settimeout(10)

    def request(self, text: bytes) -> tuple[bytes, list[socket.socket]]:
        self.core.send(text)
        data, fds, _, _ = socket.recv_fds(self.core, 64, MAX_BATCH)
        kind = data[1:3]
        family, kind_type = KINDS[kind]
        return data, [socket.socket(family, kind_type, 0, fileno=fd) for fd in fds]

    def finish(self) -> tuple[int, str]:
        self.core.close()
        try:
            _, err = self.proc.communicate(timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode, err.decode(errors="replace")


def status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


@pytest.mark.parametrize("binding", list(BINDINGS))
def test_sockets_are_what_the_python_loop_made(native, binding):
    d = Dialer(native, ("4",), binding=binding)
    try:
        for request, kind, count in ((b"t4 3", b"t4", 3), (b"t6 2", b"t6", 2), (b"u4 1", b"u4", 1),
                                     (b"u6 100", b"u6", MAX_BATCH), (b"t4", b"t4", 1), (b"u4 0", b"u4", 1)):
            data, socks = d.request(request)
            assert data == b"S" + kind and len(socks) == count, (request, data, len(socks))
            family, kind_type = KINDS[kind]
            for s in socks:
                assert s.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN) == family
                assert s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == kind_type
                assert os.get_blocking(s.fileno()) is False
                # Only IPv4 was named ready: IPv6 sockets are plain.
                transparent = family == socket.AF_INET
                if family == socket.AF_INET:
                    assert s.getsockopt(socket.IPPROTO_IP, IP_TRANSPARENT) == transparent
                else:
                    assert s.getsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT) == transparent
                assert s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == (MARK if transparent else 0)
                linger = struct.unpack("ii", s.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8))
                assert linger == ((1, 0) if kind_type == socket.SOCK_STREAM else (0, 0))
                if kind_type == socket.SOCK_STREAM:
                    assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
                s.close()
        st = status(d.proc.pid)
        assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1", st
        assert int(st["CapPrm"], 16) == int(st["CapEff"], 16) == int(st["CapBnd"], 16) == NET_ADMIN, st
        assert int(st["CapInh"], 16) == int(st["CapAmb"], 16) == 0, st
        assert st["Name"] == "portfwd-dialer"
        # ~0.2 MB instead of a forked interpreter's ~6 MB.
        assert int(st["VmRSS"].split()[0]) < 2048, st["VmRSS"]
    finally:
        code, err = d.finish()
    assert (code, err) == (0, "")


def test_the_export_is_the_same_with_both_bindings(e2e_host):
    assert exported_filter("pyseccomp") == exported_filter("python3-seccomp")


def available_congestion_control() -> list[str]:
    return Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split()


@pytest.mark.parametrize("name", ["reno", "cubic"])
def test_cc_gives_tcp_sockets_that_congestion_control(native, name):
    """congestion_control.py's choice, passed as cc=NAME: every TCP socket gets it (reno is
    always allowed; cubic may need the CAP_NET_ADMIN the dialer keeps), UDP sockets are plain."""
    if name not in available_congestion_control():
        pytest.skip(f"this kernel has no {name} congestion control")
    d = Dialer(native, ("4", f"cc={name}"))
    try:
        for request in (b"t4 3", b"t6 2", b"t4"):
            _, socks = d.request(request)
            assert [current(s) for s in socks] == [name] * len(socks), request
            for s in socks:
                s.close()
        _, socks = d.request(b"u4 2")
        assert len(socks) == 2
        for s in socks:
            s.close()
    finally:
        code, err = d.finish()
    assert (code, err) == (0, "")


def test_a_congestion_control_that_cannot_be_set_is_one_line_not_an_exit(native):
    d = Dialer(native, ("4", "cc=nosuch"))
    try:
        with socket.socket() as plain:
            default = current(plain)
        for _ in range(2):
            _, socks = d.request(b"t4 2")
            assert [current(s) for s in socks] == [default, default]
            for s in socks:
                s.close()
    finally:
        code, err = d.finish()
    assert code == 0, (code, err)
    assert err.count("\n") == 1 and err.endswith(
        ": TCP sockets keep the netns's congestion control: nosuch cannot be set (No such file or directory)\n"), err


@pytest.mark.parametrize("arg", ["cc=", "cc=" + "x" * 16, "cc"])
def test_a_bad_cc_argument_is_the_usage_line(native, arg):
    d = Dialer(native, ("4", arg))
    code, err = d.finish()
    assert code == 1 and err.count("\n") == 1 and "usage: portfwd-dialer" in err and "[cc=NAME]" in err, (code, err)


def test_a_bad_request_is_one_line_and_exit_1(native):
    d = Dialer(native)
    d.core.send(b"x9 1")
    code, err = d.finish()
    assert code == 1 and err.count("\n") == 1, (code, err)
    assert f"portfwd-dialer pid {d.proc.pid}: a request of the core is not" in err, err


def test_an_error_under_the_filter_is_a_line_not_a_kill(native):
    """strerror and the line on stderr pass the filter: a socket() that fails (no descriptor
    left) ends the dialer with exit code 1 and its reason, not SIGSYS."""

    def few_fds():
        import resource  # noqa: PLC0415

        drop_dialer()
        resource.setrlimit(resource.RLIMIT_NOFILE, (8, 8))

    d = Dialer(native, prepare=few_fds)
    d.core.send(b"t4 32")
    code, err = d.finish()
    assert code == 1, (code, err)
    assert err.endswith(": making an IPv4 socket: Too many open files\n") and err.count("\n") == 1, err


def test_it_refuses_capabilities_beyond_net_admin(native):
    def no_drop():
        import prctl  # noqa: PLC0415

        prctl.set_no_new_privs(1)

    d = Dialer(native, prepare=no_drop)
    code, err = d.finish()
    assert code == 1 and "refusing to run with capabilities other than CAP_NET_ADMIN" in err, (code, err)
    assert err.count("\n") == 1, err


def test_a_uid_other_than_0_keeps_net_admin_through_the_ambient_set(native):
    """A rootful container with a user namespace does not map host root: the dialer is not
    uid 0 there, and exec keeps its CAP_NET_ADMIN only through the ambient set
    (privileges.keep_net_admin_across_exec), which the program clears again."""
    nobody = 65534

    def as_nobody(ambient: bool):
        import prctl  # noqa: PLC0415

        prctl.securebits.keep_caps = True
        os.setgroups([])
        os.setgid(nobody)
        os.setuid(nobody)  # keeps the permitted set, clears the effective one
        prctl.set_caps(([8, 12], prctl.CAP_EFFECTIVE, True))  # setpcap: the bounding set
        drop_dialer()
        if ambient:
            keep_net_admin_across_exec()

    for ambient in (True, False):
        d = Dialer(native, prepare=lambda ambient=ambient: as_nobody(ambient))
        try:
            _, socks = d.request(b"t4 1")
            st = status(d.proc.pid)
            assert st["Uid"].split()[0] == str(nobody)
            assert int(st["CapInh"], 16) == int(st["CapAmb"], 16) == 0, st
            if ambient:
                assert int(st["CapPrm"], 16) == int(st["CapEff"], 16) == NET_ADMIN, st
                assert socks[0].getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == MARK
            else:
                assert int(st["CapPrm"], 16) == 0, st
                assert socks[0].getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0
            for s in socks:
                s.close()
        finally:
            code, err = d.finish()
        assert code == 0
        assert ("cannot be made transparent" in err) is (not ambient), err


@pytest.mark.parametrize("probe, n", [("open", 0), ("exec", 1), ("ptrace", 2)])
def test_a_forbidden_call_kills_it(native, probe, n):
    d = Dialer(native, env={"OCI_PORTFWD_TEST_SANDBOX_PROBE": "1"})
    try:
        d.request(b"u4 1")  # the filter is loaded once it answers
        os.kill(d.proc.pid, signal.SIGRTMIN + n)
        d.proc.wait(timeout=10)
    finally:
        code, err = d.finish()
    assert code == -signal.SIGSYS, (code, err)
    assert "the call was allowed" not in err


def test_socket_is_allowed_and_a_probe_says_so(native):
    d = Dialer(native, env={"OCI_PORTFWD_TEST_SANDBOX_PROBE": "1"})
    try:
        d.request(b"u4 1")
        os.kill(d.proc.pid, signal.SIGRTMIN + 3)
        data, socks = d.request(b"t6 1")  # still serving after the handler returned
        assert data == b"St6" and len(socks) == 1
    finally:
        code, err = d.finish()
    assert code == 0 and err.endswith("sandbox probe socket: the call was allowed\n"), (code, err)


def test_it_is_execute_only_and_warns_when_readable(native, tmp_path):
    """Execute-only, exec leaves it non-dumpable with its memory the host's (see the program's
    header); a readable copy still serves, with one warning line."""
    assert os.stat(native).st_mode & 0o777 == 0o111
    readable = tmp_path / "portfwd-dialer"
    readable.write_bytes(Path(native).read_bytes())
    readable.chmod(0o755)
    d = Dialer(str(readable))
    try:
        data, socks = d.request(b"t4 1")
        assert data == b"St4" and len(socks) == 1
        socks[0].close()
    finally:
        code, err = d.finish()
    assert code == 0 and err.count("\n") == 1 and "install it mode 0111 (execute-only)" in err, err
