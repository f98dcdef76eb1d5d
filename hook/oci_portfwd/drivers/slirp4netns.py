"""The slirp4netns driver: Debian's slirp4netns on the container, ports added through
its API (add_hostfwd), every reply checked.

slirp4netns 1.2 cannot publish on IPv6 host addresses (add_hostfwd rejects them): IPv6
mappings are published on IPv4 with a warning. It delivers to the container's tap
address; to honour loopback bindings (a service on 127.0.0.1 only, or 127.0.0.2 kept
as 127.0.0.2), the container's tap0 gets route_localnet=1 and the guest address is the
loopback address the policy names.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import StartError
from ..listeners import Listener
from ..logs import HookLog
from ..namespaces import run_inside
from ..plan import Plan
from ..polling import wait_readable
from ..ports import PortMapping
from ..status import StatusWriter
from . import Capabilities, Driver, Warn, check_capabilities
from .external import ContainerNamespaces, find_program, serve_until_exit, spawn, stop

TAP = "tap0"
GUEST_ADDRESS = "10.0.2.100"  # slirp4netns' default for the container (--cidr 10.0.2.0/24)
MTU = 65520


class Slirp4netnsDriver(Driver):
    name = "slirp4netns"
    capabilities = Capabilities(
        tcp=True,
        udp=True,
        ipv4=True,
        ipv6=False,
        family_fallback=False,
        preserves_loopback_address=True,
        outbound=True,
        # slirp4netns 1.2 drops UDP replies with --disable-host-loopback and answers from
        # another source port without it (a connected client, e.g. a resolver, drops
        # that): UDP goes through the builtin relay in the same core process.
        holds_listeners=frozenset({"udp"}),
    )

    def check(self, plan: Plan, warn: Warn) -> Plan:
        find_program("slirp4netns", "slirp4netns")
        return check_capabilities(plan, self.name, self.capabilities, warn)

    def run(
        self,
        plan: Plan,
        listeners: Sequence[Listener],
        status: StatusWriter,
        log: HookLog,
        sandbox: object = None,  # not used: this process restarts the program (README "Privileges")
    ) -> int:
        from .. import procctl  # noqa: PLC0415

        procctl.set_name("portfwd-slirp")
        namespaces = ContainerNamespaces(plan, status, log)
        api_dir = Path(tempfile.mkdtemp(prefix="portfwd-slirp-"))
        api_socket = api_dir / "api.sock"
        ready_r, ready_w = os.pipe()
        argv = [
            find_program("slirp4netns", "slirp4netns"),
            "--configure",
            f"--mtu={MTU}",
            f"--api-socket={api_socket}",
            f"--ready-fd={ready_w}",
            "--netns-type=path",
        ]
        if not plan.allow_host_loopback:
            argv.append("--disable-host-loopback")
        if namespaces.user_path:
            argv.append(f"--userns-path={namespaces.user_path}")
        argv += [namespaces.net_path, TAP]
        proc = spawn(argv, [ready_w, *namespaces.fds()], log)
        os.close(ready_w)
        try:
            _await_ready_fd(ready_r, proc.pid, plan.ready_timeout)
            if any(_guest_address(plan, m).startswith("127.") for m in plan.mappings if m.proto == "tcp"):
                run_inside(namespaces.user_fd, namespaces.net_fd, "the container", _route_localnet)
            for m in plan.mappings:
                if m.proto not in self.capabilities.holds_listeners:
                    _add_hostfwd(api_socket, m, _guest_address(plan, m))
                log.info("slirp4netns publishes %s → %s:%d", m, _guest_address(plan, m), m.container_port)
        except BaseException:
            stop(proc)
            shutil.rmtree(api_dir, ignore_errors=True)
            raise
        try:
            return serve_until_exit(proc, "slirp4netns", plan, listeners, status, log)
        finally:
            stop(proc)
            shutil.rmtree(api_dir, ignore_errors=True)


def _guest_address(plan: Plan, m: PortMapping) -> str:
    if plan.loopback == "container-address":
        return GUEST_ADDRESS
    if plan.loopback == "preserve" and m.host_ip and ipaddress.ip_address(m.host_ip).is_loopback:
        return m.host_ip
    return "127.0.0.1"


def _route_localnet() -> None:
    # Packets from slirp (10.0.2.2) to 127.0.0.0/8 arrive on tap0; the kernel drops them
    # as martians unless route_localnet is on for that interface.
    with open(f"/proc/sys/net/ipv4/conf/{TAP}/route_localnet", "w") as f:
        f.write("1")


def _await_ready_fd(fd: int, pid: int, timeout: float) -> None:
    try:
        if not wait_readable([fd], timeout):
            raise StartError(f"slirp4netns (pid {pid}) did not configure {TAP} within {timeout:g}s")
        if os.read(fd, 1) != b"1":
            raise StartError(f"slirp4netns (pid {pid}) exited before {TAP} was configured; see the log")
    finally:
        os.close(fd)


def _add_hostfwd(api_socket: Path, m: PortMapping, guest_addr: str) -> None:
    request = {
        "execute": "add_hostfwd",
        "arguments": {
            "proto": m.proto,
            "host_addr": m.host_ip or "0.0.0.0",
            "host_port": m.host_port,
            "guest_addr": guest_addr,
            "guest_port": m.container_port,
        },
    }
    reply = _api_call(api_socket, request)
    if "error" in reply:
        desc = reply["error"].get("desc", reply["error"]) if isinstance(reply["error"], dict) else reply["error"]
        raise StartError(f"slirp4netns refused to publish {m}: {desc}")
    if "return" not in reply:
        raise StartError(f"slirp4netns gave no answer for {m}: {reply!r}")


def _api_call(api_socket: Path, request: Mapping[str, object]) -> dict[str, object]:
    # One request per connection; slirp4netns answers and closes.
    deadline = time.monotonic() + 5
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(api_socket))
        s.sendall(json.dumps(request).encode())
        s.shutdown(socket.SHUT_WR)
        data = b""
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        reply = json.loads(data)
    except ValueError:
        raise StartError(f"slirp4netns answered {data[:200]!r}, not JSON") from None
    if not isinstance(reply, dict):
        raise StartError(f"slirp4netns answered {reply!r}")
    return reply
