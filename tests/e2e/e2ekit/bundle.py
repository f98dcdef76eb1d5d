"""config.json for a test container: `runc spec`'s defaults, made non-interactive and given the
host's /usr, our annotations and our hooks."""

import json
from pathlib import Path

from .rootfs import USR_MOUNT

_DEFAULT_MOUNTS = [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
     "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
    {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
     "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
    {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
     "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
    {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
     "options": ["nosuid", "noexec", "nodev"]},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs",
     "options": ["nosuid", "noexec", "nodev", "ro"]},
    {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]},
    USR_MOUNT,
]

_CAPS = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]


def make_config(*, rootfs: Path, args: list[str], annotations: dict[str, str],
                hooks: dict[str, list[dict]] | None) -> dict:
    config = {
        "ociVersion": "1.0.2-dev",
        "process": {
            # A terminal would make `run -d` demand a console socket.
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONDONTWRITEBYTECODE=1"],
            "cwd": "/",
            "capabilities": {k: list(_CAPS) for k in
                             ("bounding", "effective", "permitted", "ambient")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096}],
            "noNewPrivileges": True,
        },
        # Absolute: one rootfs serves every container of the session; read-only keeps it so.
        "root": {"path": str(rootfs), "readonly": True},
        "hostname": "portfwd-test",
        "mounts": [dict(m) for m in _DEFAULT_MOUNTS],
        "annotations": dict(annotations),
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                            "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                            "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"],
        },
    }
    if hooks:
        config["hooks"] = hooks
    return config


def write_bundle(bundle: Path, config: dict) -> Path:
    bundle.mkdir(parents=True, exist_ok=True)
    (bundle / "config.json").write_text(json.dumps(config, indent=2))
    return bundle


def make_rootless(config: dict, uid: int, gid: int) -> dict:
    """What `runc spec --rootless` changes, run as the user (uid, gid), with the network
    namespace put back: without it the container shares the host's network and there is
    nothing to forward. No linux.resources: any limit makes rootless runc fail."""
    config = json.loads(json.dumps(config))
    linux = config["linux"]
    linux.pop("resources", None)
    types = [ns["type"] for ns in linux["namespaces"]]
    for wanted in ("network", "user"):
        if wanted not in types:
            linux["namespaces"].append({"type": wanted})
    linux["uidMappings"] = [{"containerID": 0, "hostID": uid, "size": 1}]
    linux["gidMappings"] = [{"containerID": 0, "hostID": gid, "size": 1}]
    for mount in config["mounts"]:
        if mount["destination"] == "/sys":
            # As runc's rootless spec: a bind of the host's /sys, which a user may always do.
            mount.update(type="none", source="/sys",
                         options=["rbind", "nosuid", "noexec", "nodev", "ro"])
        elif mount["destination"] == "/dev/pts":
            # gid 5 (tty) is not mapped.
            mount["options"] = [o for o in mount["options"] if o != "gid=5"]
    return config
