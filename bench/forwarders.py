"""The forwarders under test. Each `setup` builds a fresh instance: the same two servers
(`iperf3 -s -p 5201` and bench-httpd on 8000) in a network namespace of its own, and the
forwarder publishing them on 127.0.0.1:IPERF_PORT (TCP and UDP) and 127.0.0.1:HTTP_PORT.

An Instance knows the forwarder's processes (for RSS and CPU) and tears everything down.
"""

import json
import os
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from infra import (
    SYS_PATH,
    Cleanup,
    CommandLog,
    Netns,
    Proc,
    free_port,
    http_ok,
    kill_procs,
    listening,
    run,
    run_timed,
    start,
    tcp_sockets,
    tree,
    wait_for,
)

IPERF_INNER = 5201
HTTP_INNER = 8000
SERVER_COMMS = {"iperf3", "bench-httpd", "sh", "nsenter"}
READY_TIMEOUT = 20

# crun refuses a hybrid cgroup host whose v2 hierarchy has a controller: mask that file in a
# private mount namespace for crun's `run` only (recipes.md; the tests do the same).
HYBRID_CONTROLLERS = Path("/sys/fs/cgroup/unified/cgroup.controllers")
CRUN_WRAPPER = """#!/bin/sh
exec unshare -m --propagation slave sh -c \\
  'mount --bind /dev/null {controllers} && exec crun "$@"' crun "$@"
"""


def servers_script(httpd: str) -> str:
    """The container's / netns's command: iperf3 in the background, the HTTP server in front."""
    return (f"iperf3 -s -p {IPERF_INNER} >/dev/null 2>&1 & "
            f"exec {httpd} {HTTP_INNER}")


@dataclass
class Env:
    """What every forwarder setup needs."""
    work: Path
    cleanup: Cleanup
    cmdlog: CommandLog
    ports: set[int]
    httpd: Path            # host path of the compiled server (world-readable directory)
    rootfs: Path           # the container image (busybox + host /usr)
    crun_run: str          # crun, or the wrapper for `run`
    crun_root: Path
    hook: Path
    hook_config: Path
    hook_state: Path
    bench_user: "BenchUser | None" = None
    tun_node: Path | None = None
    rootless: "RootlessCrun | None" = None


@dataclass
class BenchUser:
    name: str
    uid: int
    gid: int
    home: Path

    def prefix(self, *env: str) -> list[str]:
        """argv prefix that runs a command as the user, with a clean environment."""
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups",
                "env", "-i", f"PATH={SYS_PATH}", f"HOME={self.home}", f"USER={self.name}", *env]


@dataclass
class RootlessCrun:
    """ours-rootless: crun run by the bench user (a user namespace mapping root in the container
    to it), as tests/e2e run rootless crun. Everything it writes is in `area`, a 0700 directory
    of the user's: crun's --root, the bundles, the hook's config and state dir (the hook, its
    supervisor and relay run as the user)."""
    user: BenchUser
    area: Path
    crun_run: list[str]    # argv of `crun` for `run` (as the user; the cgroup wrapper if needed)
    crun: list[str]        # argv of `crun` for kill / delete, as the user
    crun_root: Path
    hook_config: Path
    hook_state: Path
    problem: str | None = None   # why the row cannot run here (e.g. the user cannot run the hook)


@dataclass
class Instance:
    name: str
    iperf_port: int
    http_port: int
    cleanup: Cleanup
    token: object
    env: Env
    # Processes of the forwarder itself (not the servers), found afresh at each call.
    procs_fn: object = None
    core_fn: object = None
    notes: list[str] = field(default_factory=list)
    # Figures known from the setup itself (e.g. whether the service sees the client's address).
    facts: dict = field(default_factory=dict)

    def procs(self) -> list[Proc]:
        return self.procs_fn() if self.procs_fn else []

    def core_procs(self) -> list[Proc]:
        return self.core_fn() if self.core_fn else []

    def teardown(self) -> None:
        self.env.cleanup.pop(self.token)


def _new_instance(env: Env, name: str) -> Instance:
    own = Cleanup()
    token = env.cleanup.push(f"forwarder {name}", own.run_all)
    return Instance(name=name, iperf_port=free_port(env.ports), http_port=free_port(env.ports),
                    cleanup=own, token=token, env=env)


def _wait_servers(pid_in_netns: int) -> None:
    wait_for(lambda: listening(pid_in_netns, IPERF_INNER) and listening(pid_in_netns, HTTP_INNER),
             READY_TIMEOUT, "iperf3 and bench-httpd to listen")


def _wait_published(inst: Instance) -> None:
    wait_for(lambda: http_ok(inst.http_port), READY_TIMEOUT,
             f"{inst.name}: HTTP through 127.0.0.1:{inst.http_port}")
    # the iperf3 port: a TCP connect is enough to know the forwarder listens (iperf3 -s shrugs
    # off a control connection that closes at once)
    wait_for(lambda: _tcp_connects(inst.iperf_port), READY_TIMEOUT,
             f"{inst.name}: 127.0.0.1:{inst.iperf_port} to accept")
    time.sleep(0.3)


def _tcp_connects(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _servers_in_netns(env: Env, inst: Instance, ns: Netns, key: str):
    argv = ns.prefix() + ["sh", "-c", servers_script(str(env.httpd))]
    env.cmdlog.note(key, argv[:1] + ["--net=/run/netns/NAME"] + argv[2:])
    proc = start(inst.cleanup, argv, env.work / f"{inst.name}-servers.log", "servers")
    _wait_servers(proc.pid)
    return proc


# ------------------------------------------------------------------ loopback baseline


def setup_loopback(env: Env) -> Instance:
    inst = _new_instance(env, "loopback")
    key = "loopback"
    ip = ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(inst.iperf_port)]
    ht = [str(env.httpd), str(inst.http_port), "127.0.0.1"]
    env.cmdlog.note(key, ip[:-1] + ["IPERF_PORT"])
    env.cmdlog.note(key, [ht[0], "HTTP_PORT", "127.0.0.1"])
    p1 = start(inst.cleanup, ip, env.work / "loopback-iperf.log", "iperf3 -s")
    p2 = start(inst.cleanup, ht, env.work / "loopback-httpd.log", "bench-httpd")
    wait_for(lambda: listening(p1.pid, inst.iperf_port) and listening(p2.pid, inst.http_port),
             READY_TIMEOUT, "loopback servers")
    _wait_published(inst)
    return inst


# ------------------------------------------------------------------ socat over a veth pair


def setup_socat(env: Env) -> Instance:
    inst = _new_instance(env, "socat")
    key = "socat"
    ns = Netns(inst.cleanup, env.cmdlog, key)
    host_if, ns_if = f"pfb{uuid.uuid4().hex[:6]}h", "eth0"
    host_ip, ns_ip = _free_subnet()
    run(["ip", "link", "add", host_if, "mtu", "65520", "type", "veth", "peer", "name", ns_if,
         "mtu", "65520", "netns", ns.name])
    inst.cleanup.push(f"veth {host_if}", lambda: run(["ip", "link", "del", host_if], check=False))
    run(["ip", "addr", "add", f"{host_ip}/30", "dev", host_if])
    run(["ip", "link", "set", host_if, "up"])
    run(ns.prefix() + ["ip", "addr", "add", f"{ns_ip}/30", "dev", ns_if])
    run(ns.prefix() + ["ip", "link", "set", ns_if, "up"])
    env.cmdlog.note(key, "ip link add HOSTIF mtu 65520 type veth peer name eth0 mtu 65520 netns NAME; "
                         "ip addr add 10.213.X.1/30 dev HOSTIF (host end), 10.213.X.2/30 on eth0 "
                         "(netns end); both up")
    _servers_in_netns(env, inst, ns, key)
    cmds = [
        ["socat", f"TCP4-LISTEN:{inst.iperf_port},bind=127.0.0.1,fork,reuseaddr,backlog=4096",
         f"TCP4:{ns_ip}:{IPERF_INNER}"],
        ["socat", f"UDP4-LISTEN:{inst.iperf_port},bind=127.0.0.1,fork,reuseaddr",
         f"UDP4:{ns_ip}:{IPERF_INNER}"],
        ["socat", f"TCP4-LISTEN:{inst.http_port},bind=127.0.0.1,fork,reuseaddr,backlog=4096",
         f"TCP4:{ns_ip}:{HTTP_INNER}"],
    ]
    procs = []
    for argv in cmds:
        env.cmdlog.note(key, [a.replace(str(inst.iperf_port), "IPERF_PORT")
                              .replace(str(inst.http_port), "HTTP_PORT")
                              .replace(ns_ip, "10.213.X.2") for a in argv])
        procs.append(start(inst.cleanup, argv, env.work / "socat.log", "socat"))
    inst.procs_fn = lambda: [p for sp in procs for p in tree(sp.pid)]
    _wait_published(inst)
    return inst


def _free_subnet() -> tuple[str, str]:
    """10.213.X.0/30 not overlapping anything the host has routes for."""
    routes = run(["ip", "-4", "route", "show", "table", "all"]).stdout
    for _ in range(100):
        x = int.from_bytes(os.urandom(1), "big")
        base = f"10.213.{x}."
        if base not in routes and "10.213.0.0" not in routes and "10.0.0.0/8" not in routes:
            return base + "1", base + "2"
    raise RuntimeError("no free 10.213.X.0/30 subnet")


# ------------------------------------------------------------------ slirp4netns alone


def setup_slirp4netns(env: Env) -> Instance:
    inst = _new_instance(env, "slirp4netns")
    key = "slirp4netns"
    ns = Netns(inst.cleanup, env.cmdlog, key)
    _servers_in_netns(env, inst, ns, key)
    api = env.work / f"slirp-{uuid.uuid4().hex[:6]}.sock"
    argv = ["slirp4netns", "--configure", "--mtu=65520", "--disable-host-loopback",
            "--api-socket", str(api), "--netns-type=path", ns.path, "tap0"]
    env.cmdlog.note(key, [a.replace(str(api), "API_SOCKET").replace(ns.path, "/run/netns/NAME")
                          for a in argv])
    proc = start(inst.cleanup, argv, env.work / "slirp4netns.log", "slirp4netns")
    wait_for(api.exists, READY_TIMEOUT, "slirp4netns' API socket")
    for proto, hport, gport in (("tcp", inst.iperf_port, IPERF_INNER),
                                ("udp", inst.iperf_port, IPERF_INNER),
                                ("tcp", inst.http_port, HTTP_INNER)):
        req = {"execute": "add_hostfwd", "arguments": {
            "proto": proto, "host_addr": "127.0.0.1", "host_port": hport, "guest_port": gport}}
        reply = _slirp_api(api, req)
        if "error" in reply:
            raise RuntimeError(f"slirp4netns add_hostfwd {req}: {reply}")
        env.cmdlog.note(key, "API_SOCKET <- " + json.dumps(req)
                        .replace(str(inst.iperf_port), "IPERF_PORT")
                        .replace(str(inst.http_port), "HTTP_PORT"))
    inst.procs_fn = lambda: tree(proc.pid)
    _wait_published(inst)
    return inst


def _slirp_api(sock_path: Path, req: dict) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(sock_path))
        s.sendall(json.dumps(req).encode())
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return json.loads(data or b"{}")


# ------------------------------------------------------------------ pasta alone


def setup_pasta(env: Env) -> Instance:
    inst = _new_instance(env, "pasta")
    key = "pasta"
    ns = Netns(inst.cleanup, env.cmdlog, key)
    _servers_in_netns(env, inst, ns, key)
    # one address/port spec per -t option
    argv = ["pasta", "-f", "--runas", "0", "--netns", ns.path,
            "-t", f"127.0.0.1/{inst.iperf_port}:{IPERF_INNER}",
            "-t", f"127.0.0.1/{inst.http_port}:{HTTP_INNER}",
            "-u", f"127.0.0.1/{inst.iperf_port}:{IPERF_INNER}",
            "-T", "none", "-U", "none"]
    env.cmdlog.note(key, [a.replace(str(inst.iperf_port), "IPERF_PORT")
                          .replace(str(inst.http_port), "HTTP_PORT")
                          .replace(ns.path, "/run/netns/NAME") for a in argv])
    proc = start(inst.cleanup, argv, env.work / "pasta.log", "pasta")
    inst.procs_fn = lambda: tree(proc.pid)
    _wait_published(inst)
    return inst


# ------------------------------------------------------------------ rootlesskit


def setup_rootlesskit(env: Env, port_driver: str) -> Instance:
    """rootlesskit refuses root (no subuid range for root): it runs as the bench user, in a
    private mount namespace where /dev/net/tun is a 0666 copy of the device node (the host's
    node stays 0600)."""
    name = f"rootlesskit-{port_driver}"
    inst = _new_instance(env, name)
    user = env.bench_user
    assert user is not None and env.tun_node is not None
    state = env.work / f"rk-{uuid.uuid4().hex[:6]}"
    state.mkdir(mode=0o700)
    os.chown(state, user.uid, user.gid)
    rk = ["rootlesskit", "--net=slirp4netns", f"--port-driver={port_driver}",
          "--disable-host-loopback", "--state-dir", str(state / "st"),
          "sh", "-c", servers_script(str(env.httpd))]
    as_user = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups",
               "env", "-i", f"PATH={SYS_PATH}", f"HOME={user.home}", f"USER={user.name}"]
    argv = ["unshare", "-m", "--propagation", "slave", "sh", "-c",
            'mount --bind "$1" /dev/net/tun && shift && exec "$@"', "sh", str(env.tun_node),
            *as_user, *rk]
    env.cmdlog.note(name, [a.replace(str(state), "STATE").replace(str(env.tun_node), "TUN_0666_NODE")
                           for a in argv])
    proc = start(inst.cleanup, argv, env.work / f"{name}.log", name, cwd="/")
    api, child_pid_file = state / "st" / "api.sock", state / "st" / "child_pid"
    wait_for(lambda: api.exists() and child_pid_file.exists() and
             child_pid_file.read_text().strip().isdigit(), READY_TIMEOUT, f"{name} to start")
    child = int(child_pid_file.read_text())
    _wait_servers(child)
    ctl = ["rootlessctl", "--socket", str(api), "add-ports",
           f"127.0.0.1:{inst.iperf_port}:{IPERF_INNER}/tcp",
           f"127.0.0.1:{inst.iperf_port}:{IPERF_INNER}/udp",
           f"127.0.0.1:{inst.http_port}:{HTTP_INNER}/tcp"]
    env.cmdlog.note(name, [a.replace(str(state), "STATE").replace(str(inst.iperf_port), "IPERF_PORT")
                           .replace(str(inst.http_port), "HTTP_PORT") for a in ctl])
    run(ctl, timeout=30)

    def procs() -> list[Proc]:
        return [p for p in tree(proc.pid) if p.comm() not in SERVER_COMMS]
    inst.procs_fn = procs
    _wait_published(inst)
    return inst


# ------------------------------------------------------------------ ours: the hook under crun


def crun_config(env: Env, args: list[str], annotations: dict[str, str], hooks: bool,
                hook_path: str | None = None, rootless: RootlessCrun | None = None,
                hook_args: list[str] | None = None) -> dict:
    hook_config = rootless.hook_config if rootless else env.hook_config
    # The hook's test switches (OCI_PORTFWD_TEST_*, e.g. the Python relay) pass through from
    # the bench's own environment, for trying one side of a change with bench/probe.py.
    switches = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("OCI_PORTFWD_TEST_")]
    hook_entry = lambda stage: {  # noqa: E731
        "path": hook_path or str(env.hook), "args": hook_args or ["oci-portfwd-hook", stage],
        "env": [f"PATH={SYS_PATH}", f"OCI_PORTFWD_CONFIG={hook_config}", *switches], "timeout": 30}
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    config = {
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": False, "user": {"uid": 0, "gid": 0}, "args": args, "cwd": "/",
            "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted", "ambient")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 8192, "soft": 8192}],
            "noNewPrivileges": True,
        },
        "root": {"path": str(env.rootfs), "readonly": True},
        "hostname": "pfbench",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]},
            {"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]},
        ],
        "annotations": annotations,
        "linux": {"namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")]},
    }
    if hooks:
        config["hooks"] = {"prestart": [hook_entry("prestart")], "poststop": [hook_entry("poststop")]}
    if rootless:
        # What tests/e2e/e2ekit/bundle.py's make_rootless changes: a user namespace with the
        # user as the container's root, and the host's /sys bound (a user may not mount sysfs).
        config["linux"]["namespaces"].append({"type": "user"})
        config["linux"]["uidMappings"] = [{"containerID": 0, "hostID": rootless.user.uid, "size": 1}]
        config["linux"]["gidMappings"] = [{"containerID": 0, "hostID": rootless.user.gid, "size": 1}]
        for mount in config["mounts"]:
            if mount["destination"] == "/sys":
                mount.update(type="none", source="/sys", options=["rbind", "nosuid", "noexec", "nodev", "ro"])
    return config


class CrunContainer:
    def __init__(self, env: Env, cleanup: Cleanup, args: list[str], annotations: dict[str, str],
                 hooks: bool, hook_path: str | None = None, rootless: bool = False,
                 hook_args: list[str] | None = None) -> None:
        self.env = env
        self.rootless = env.rootless if rootless else None
        if rootless and self.rootless is None:
            raise RuntimeError("rootless crun was not prepared (bench/run.py's prepare)")
        if self.rootless and self.rootless.problem:
            raise RuntimeError(self.rootless.problem)
        self.id = f"pfb{uuid.uuid4().hex[:10]}"
        self.bundle = (self.rootless.area if self.rootless else env.work) / "bundles" / self.id
        self.bundle.mkdir(parents=True)
        (self.bundle / "config.json").write_text(
            json.dumps(crun_config(env, args, annotations, hooks, hook_path, self.rootless, hook_args), indent=1))
        if self.rootless:
            # crun, as the user, reads the bundle and writes the pid file there
            for path in (self.bundle.parent, self.bundle, self.bundle / "config.json"):
                os.chown(path, self.rootless.user.uid, self.rootless.user.gid)
        self.hook_state = self.rootless.hook_state if self.rootless else env.hook_state
        self.pid: int | None = None
        self._created = False
        cleanup.push(f"container {self.id}", self.stop)

    def run_argv(self) -> list[str]:
        if self.rootless:
            crun, root = self.rootless.crun_run, self.rootless.crun_root
        else:
            crun, root = [self.env.crun_run], self.env.crun_root
        return [*crun, "--root", str(root), "run", "-d",
                "--bundle", str(self.bundle), "--pid-file", str(self.bundle / "pid"), self.id]

    def run(self) -> float:
        """`crun run -d`; returns its wall time in seconds."""
        self._created = True
        # Output to a file, never a pipe: the container inherits it and a pipe would only
        # reach EOF when the container exits.
        out = self.bundle / "run.out"
        with open(out, "wb") as f:
            rc, elapsed = run_timed(self.run_argv(), f)
        if rc != 0:
            log = self.hook_state / f"{self.id}.log"
            raise RuntimeError(f"crun run {self.id} failed: {out.read_text().strip()}\n"
                               f"hook log: {log.read_text() if log.exists() else '(none)'}")
        self.pid = int((self.bundle / "pid").read_text())
        return elapsed

    def supervisor(self) -> Proc | None:
        try:
            pid = int(json.loads((self.hook_state / f"{self.id}.json").read_text())["supervisor_pid"])
        except (OSError, ValueError, KeyError):
            return None
        p = Proc.of(pid)
        return p if p is not None and p.comm().startswith("portfwd:") else None

    def stop(self) -> float:
        """kill + delete (poststop runs in delete); then any supervisor left is killed by pid.
        Returns the wall time of the delete."""
        if not self._created:
            return 0.0
        sup = self.supervisor()
        if self.rootless:  # as the user: poststop runs in delete, as the user's hook
            crun = [*self.rootless.crun, "--root", str(self.rootless.crun_root)]
        else:
            crun = ["crun", "--root", str(self.env.crun_root)]
        quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL,
                 "stderr": subprocess.DEVNULL, "check": False}
        subprocess.run(crun + ["kill", self.id, "KILL"], timeout=30, **quiet)
        _, elapsed = run_timed(crun + ["delete", "-f", self.id], subprocess.DEVNULL)
        self._created = False
        if sup is not None and sup.alive():
            kill_procs(tree(sup.pid))
        return elapsed


def setup_ours(env: Env, driver: str, source_address: str = "client", rootless: bool = False) -> Instance:
    """source_address: what the service sees (the default, `client`, binds each container-side
    socket to the client's address; `loopback` does not). rootless: crun run by the bench user
    (env.rootless), the hook too."""
    name = "ours-rootless" if rootless else (
        f"ours-{driver}" + ("-loopback" if source_address == "loopback" else ""))
    inst = _new_instance(env, name)
    ports = (f"127.0.0.1:{inst.iperf_port}:{IPERF_INNER}/tcp,"
             f"127.0.0.1:{inst.iperf_port}:{IPERF_INNER}/udp,"
             f"127.0.0.1:{inst.http_port}:{HTTP_INNER}/tcp")
    annotations = {"io.oci-portfwd.ports": ports, "io.oci-portfwd.driver": driver,
                   "io.oci-portfwd.source-address": source_address}
    args = ["/bin/sh", "-c", servers_script("/srv/bench-httpd")]
    c = CrunContainer(env, inst.cleanup, args, annotations, hooks=True, rootless=rootless)
    env.cmdlog.note(name, "config.json: annotations " + json.dumps(annotations)
                    .replace(str(inst.iperf_port), "IPERF_PORT").replace(str(inst.http_port), "HTTP_PORT")
                    + "; process.args " + json.dumps(args)
                    + f"; hooks prestart+poststop = {env.hook} (env OCI_PORTFWD_CONFIG)"
                    + ("; linux.namespaces + user, uidMappings/gidMappings [0 → the user's uid/gid, "
                       "size 1], /sys bound from the host" if rootless else ""))
    env.cmdlog.note(name, [a.replace(c.id, "ID").replace(str(env.work), "WORK") for a in c.run_argv()])
    c.run()
    assert c.pid is not None
    _wait_servers(c.pid)

    def procs() -> list[Proc]:
        sup = c.supervisor()
        return tree(sup.pid) if sup else []

    def core() -> list[Proc]:
        # the relay process, and for the slirp4netns / pasta drivers the program it runs
        relays = [p for p in procs() if p.comm() in ("portfwd-core", "portfwd-slirp", "portfwd-pasta")]
        return [q for r in relays for q in tree(r.pid) if q.comm() != "portfwd-dialer"]
    inst.procs_fn, inst.core_fn = procs, core
    _wait_published(inst)
    inst.facts["source_address"] = source_address
    inst.facts["service_sees_client"] = service_sees_client(inst.http_port, c.pid)
    return inst


def service_sees_client(http_port: int, pid_in_netns: int, timeout: float = 3.0) -> bool | None:
    """Does the HTTP server in the container see this client's own address and port (what
    source_address client promises)? A connection with half a request (the server waits for
    the rest) and the server's side of it in the container's /proc/PID/net/tcp. None: no
    connection seen there at all."""
    try:
        with socket.create_connection(("127.0.0.1", http_port), timeout=timeout) as s:
            s.sendall(b"GET / HTTP/1.1\r\n")
            host, port = s.getsockname()[:2]
            want = (socket.inet_aton(host)[::-1].hex().upper(), port)
            deadline = time.monotonic() + timeout
            seen = None
            while time.monotonic() < deadline:
                peers = _established_peers(pid_in_netns, HTTP_INNER)
                if want in peers:
                    return True
                seen = False if peers else seen
                time.sleep(0.05)
            return seen
    except OSError:
        return None


V4_MAPPED_HEX = "0000000000000000FFFF0000"  # ::ffff:a.b.c.d in /proc/net/tcp6


def _established_peers(pid: int, local_port: int) -> set[tuple[str, int]]:
    """(remote address as /proc hex, remote port) of connections established to local_port;
    an IPv4 client of a dual-stack server (bench-httpd listens on [::]) as its IPv4 hex."""
    out = set()
    for f in tcp_sockets(pid):
        if f[3] == "01" and int(f[1].rsplit(":", 1)[1], 16) == local_port:
            addr, port = f[2].rsplit(":", 1)
            out.add((addr.removeprefix(V4_MAPPED_HEX), int(port, 16)))
    return out


FORWARDERS = {
    "ours-builtin": lambda env: setup_ours(env, "builtin"),
    "rootlesskit-builtin": lambda env: setup_rootlesskit(env, "builtin"),
    "rootlesskit-slirp4netns": lambda env: setup_rootlesskit(env, "slirp4netns"),
    "pasta": setup_pasta,
    "slirp4netns": setup_slirp4netns,
    "socat": setup_socat,
    "loopback": setup_loopback,
    "ours-slirp4netns": lambda env: setup_ours(env, "slirp4netns"),
    "ours-pasta": lambda env: setup_ours(env, "pasta"),
    "ours-builtin-loopback": lambda env: setup_ours(env, "builtin", "loopback"),
    "ours-rootless": lambda env: setup_ours(env, "builtin", rootless=True),
}

LABELS = {
    "ours-builtin": "ours, builtin (hook + crun)",
    "ours-builtin-loopback": "ours, builtin, source_address loopback",
    "ours-rootless": "ours, builtin, rootless (hook + crun as an unprivileged user)",
    "ours-slirp4netns": "ours, slirp4netns driver",
    "ours-pasta": "ours, pasta driver",
    "rootlesskit-builtin": "rootlesskit --port-driver=builtin",
    "rootlesskit-slirp4netns": "rootlesskit --port-driver=slirp4netns",
    "pasta": "pasta alone",
    "slirp4netns": "slirp4netns alone",
    "socat": "socat (fork, veth)",
    "loopback": "direct loopback (no forwarder)",
}

