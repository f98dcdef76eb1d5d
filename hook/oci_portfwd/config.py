"""The global config file (schemas/config.schema.json)."""

from __future__ import annotations

import os

from .errors import ConfigError, loads_strict
from .regularfile import read_regular

# typing costs ~5 ms to import on the container's start path; annotations need it only
# for the type checker, which treats TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

DEFAULT_CONFIG_PATH = "/etc/containers/oci-portfwd.json"
CONFIG_ENV = "OCI_PORTFWD_CONFIG"
MAX_CONFIG_BYTES = 1 << 20


class Config:
    """The config's values (a plain class with the dataclass's behaviour, not a dataclass:
    the start and stop paths run on every container start, and dataclasses brings inspect,
    ast and dis along, ~6 ms; issue 12)."""

    __slots__ = (
        "driver", "loopback", "state_dir", "udp_idle_timeout", "max_ports", "ready_timeout",
        "log_level", "allow_host_loopback", "source_address", "runtime", "core_user", "source",
    )
    driver: str
    loopback: str
    state_dir: str | None
    udp_idle_timeout: float
    max_ports: int
    ready_timeout: float
    log_level: str
    allow_host_loopback: bool
    source_address: str
    runtime: str | None
    core_user: str
    source: str

    def __init__(
        self,
        driver: str = "builtin",
        loopback: str = "preserve",
        state_dir: str | None = None,
        udp_idle_timeout: float = 60,
        max_ports: int = 1024,
        ready_timeout: float = 10,
        log_level: str = "info",
        allow_host_loopback: bool = False,
        source_address: str = "client",
        # oci-portfwd-runtime's real runtime (None: runc, else crun, on PATH); the hook ignores it.
        runtime: str | None = None,
        core_user: str = "nobody",
        source: str = "built-in defaults",
    ) -> None:
        set_ = object.__setattr__
        set_(self, "driver", driver)
        set_(self, "loopback", loopback)
        set_(self, "state_dir", state_dir)
        set_(self, "udp_idle_timeout", udp_idle_timeout)
        set_(self, "max_ports", max_ports)
        set_(self, "ready_timeout", ready_timeout)
        set_(self, "log_level", log_level)
        set_(self, "allow_host_loopback", allow_host_loopback)
        set_(self, "source_address", source_address)
        set_(self, "runtime", runtime)
        set_(self, "core_user", core_user)
        set_(self, "source", source)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Config is frozen: cannot set {name}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Config):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, k) for k in self.__slots__))

    def __repr__(self) -> str:
        return "Config(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"


def config_path(env: Mapping[str, str], explicit: str | None = None) -> tuple[str, bool]:
    """The file to read and whether it must exist (named by the user, not the default)."""
    if explicit:
        return explicit, True
    if env.get(CONFIG_ENV):
        return env[CONFIG_ENV], True
    return DEFAULT_CONFIG_PATH, False


def load_config(
    env: Mapping[str, str], explicit: str | None = None, *, validate_schema: bool = True, thorough: bool = False
) -> Config:
    """Read and validate the config. Without validation (poststop: it only needs to find the
    state dir, fast) unknown keys are ignored and a broken file raises ConfigError."""
    path, required = config_path(env, explicit)
    try:
        raw = read_regular(path, MAX_CONFIG_BYTES)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path} does not exist") from None
        return Config()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        doc = loads_strict(raw)
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    if validate_schema:
        from .schema import validate  # noqa: PLC0415 - not on the stop path

        validate(doc, "config.schema.json", f"config file {path}", ConfigError, thorough=thorough)
        return config_from_dict(doc, source=path)
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    return Config(
        state_dir=doc["state_dir"] if isinstance(doc.get("state_dir"), str) and doc["state_dir"].startswith("/") else None,
        log_level=doc["log_level"] if doc.get("log_level") in ("debug", "info", "warning", "error") else "info",
        source=path,
    )


def config_from_dict(doc: Mapping[str, Any], source: str) -> Config:
    known = set(Config.__slots__) - {"source"}
    return Config(**{k: v for k, v in doc.items() if k in known}, source=source)


def host_uid(euid: int, uid_map: str = "/proc/self/uid_map") -> int:
    """Our uid as the host sees it: rootless podman runs hooks as uid 0 of its own user
    namespace, which is the unprivileged user outside."""
    try:
        lines = read_regular(uid_map, 1 << 16).decode().splitlines()
    except OSError:
        return euid
    for line in lines:
        inside, outside, count = (int(x) for x in line.split())
        if inside <= euid < inside + count:
            return outside + (euid - inside)
    return euid


# Paths are str here and in statefile.py: pathlib costs the stop path ~4 ms (fnmatch, re,
# urllib.parse; issue 12).
def default_state_dir(euid: int, env: Mapping[str, str]) -> str:
    uid = host_uid(euid)
    if uid == 0:
        return "/run/oci-portfwd"
    runtime_dir = env.get("XDG_RUNTIME_DIR")
    if runtime_dir and os.path.isabs(runtime_dir):
        return os.path.join(runtime_dir, "oci-portfwd")
    # A hook entry with its own "env" drops XDG_RUNTIME_DIR; find the same dir the user's
    # shell would name, so that `oci-portfwd-hook ps` sees what the hook wrote.
    user_run = f"/run/user/{uid}"
    try:
        if os.stat(user_run).st_uid == euid:
            return os.path.join(user_run, "oci-portfwd")
    except OSError:
        pass
    return f"/tmp/oci-portfwd-{uid}"


def state_dir_of(config: Config, env: Mapping[str, str]) -> str:
    return os.path.normpath(config.state_dir) if config.state_dir else default_state_dir(os.geteuid(), env)
