"""oci-portfwd-runtime: the hook for engines that never read hooks.d (dockerd, containerd,
nerdctl). Registered as their OCI runtime, it is called exactly like runc, for every
operation (create, start, state, kill, delete, …):

    oci-portfwd-runtime [GLOBAL FLAGS] COMMAND [FLAGS] [ID]

1. the real runtime: the config's `runtime` (a name on PATH or a path), default runc, else
   crun, on PATH;
2. on `create` and `run` only: the bundle's config.json (--bundle/-b, else the working
   directory). When the container requests ports (annotation io.oci-portfwd.ports, or
   OCI_PORTFWD_PORTS in process.env for engines that pass no annotations, the way NVIDIA's
   runtime reads NVIDIA_VISIBLE_DEVICES), check the request with the hook's own parser, copy
   the env requests into annotations (the hook reads one input) and add this installation's
   hook at prestart and poststop. A spec without a request, or that already runs our hook
   (hooks.d), is not touched;
3. exec the real runtime with the same arguments: its exit code and signals are the engine's
   to see, no process of ours stays in between.

An error (bad request, unreadable bundle, no runtime) is one line on stderr and, like runc's
own errors, in the --log file in the --log-format the engine asked for: containerd's shim
reads the last error from there, so `docker run` prints it.

This runs on every call the engine makes: until step 2 finds a request it imports only os,
sys and json (the hook's modules, dataclasses and the validators come after).
"""

from __future__ import annotations

import json
import os
import sys

from .errors import PortfwdError

# typing costs ~5 ms to import: see config.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any

PROG = "oci-portfwd-runtime"
HOOK_NAME = "oci-portfwd-hook"
DEFAULT_RUNTIMES = ("runc", "crun")
# The same as config.py's; not imported from there, which would cost every call its imports.
DEFAULT_CONFIG_PATH = "/etc/containers/oci-portfwd.json"
CONFIG_ENV = "OCI_PORTFWD_CONFIG"
# The same as plan.py's; env names map to its KNOWN_ANNOTATIONS: OCI_PORTFWD_PORTS →
# io.oci-portfwd.ports, OCI_PORTFWD_DRIVER → io.oci-portfwd.driver, …
ANNOTATION_PREFIX = "io.oci-portfwd."
PORTS_ANNOTATION = ANNOTATION_PREFIX + "ports"
ENV_PREFIX = "OCI_PORTFWD_"
CREATE_COMMANDS = ("create", "run")
# Global flags of runc and crun that take a value; every other flag is a boolean.
GLOBAL_VALUE_FLAGS = frozenset({"root", "log", "log-format", "log-level", "criu", "rootless", "cgroup-manager"})
# create/run flags that take a value (crun's -f/--config names another spec file).
CREATE_VALUE_FLAGS = frozenset({"bundle", "b", "console-socket", "pid-file", "preserve-fds", "config", "f"})
FLAG_ALIASES = {"b": "bundle", "f": "config"}
# containerd's CRI marks a pod's sandbox "sandbox" and the pod's other containers "container";
# with pod_annotations every one of them carries the pod's request, and all share the
# sandbox's network namespace: the sandbox forwards for the pod, the others would only collide.
CRI_CONTAINER_TYPE = "io.kubernetes.cri.container-type"
MAX_SPEC_BYTES = 16 << 20
MAX_CONFIG_BYTES = 1 << 20


class BundleError(PortfwdError):
    """The bundle's config.json cannot be read, understood or rewritten."""


class RuntimeNotFound(PortfwdError):
    """No real runtime to exec."""


class Invocation:
    """What the engine asked for: the global options, the command and its options."""

    __slots__ = ("args", "options", "command", "command_options", "positionals")

    def __init__(self, args: Sequence[str]) -> None:
        self.args = list(args)
        self.options, rest = _scan(self.args, GLOBAL_VALUE_FLAGS, stop_at_positional=True)
        self.command = rest[0] if rest else None
        value_flags = CREATE_VALUE_FLAGS if self.command in CREATE_COMMANDS else frozenset()
        self.command_options, self.positionals = _scan(rest[1:], value_flags, stop_at_positional=False)

    @property
    def bundle(self) -> str:
        return os.path.abspath(self.command_options.get("bundle") or ".")

    @property
    def spec_path(self) -> str:
        spec = self.command_options.get("config") or "config.json"
        return spec if os.path.isabs(spec) else os.path.join(self.bundle, spec)

    @property
    def container_id(self) -> str:
        return self.positionals[-1] if self.positionals else "container"


def _scan(
    args: Sequence[str], value_flags: frozenset[str], *, stop_at_positional: bool
) -> tuple[dict[str, str], list[str]]:
    """Go's and argp's flag forms (-x, --x, -x=V, --x V, -x V): the options (the last one
    wins) and the positionals; with stop_at_positional (runc's global flags end at the
    command) the first positional and everything after it."""
    options: dict[str, str] = {}
    positionals: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            positionals += args[i + 1 :]
            break
        if not arg.startswith("-") or arg == "-":
            if stop_at_positional:
                positionals += args[i:]
                break
            positionals.append(arg)
            i += 1
            continue
        name, eq, value = arg.lstrip("-").partition("=")
        if not eq and name in value_flags and i + 1 < len(args):
            i += 1
            value = args[i]
        options[FLAG_ALIASES.get(name, name)] = value
        i += 1
    return options, positionals


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    own = os.path.realpath(sys.argv[0])
    env = os.environ
    invocation = Invocation(args)
    try:
        runtime = resolve_runtime(configured_runtime(env), env.get("PATH", os.defpath), own)
        if invocation.command in CREATE_COMMANDS:
            prepare_bundle(invocation, env, own)
    except PortfwdError as e:
        return fail(str(e), invocation)
    except Exception as e:  # noqa: BLE001 - a bug: the engine must still show one line
        if env.get("OCI_PORTFWD_DEBUG"):
            import traceback  # noqa: PLC0415 - bugs only

            traceback.print_exc(file=sys.stderr)
        return fail(f"internal error (a bug, please report it): {type(e).__name__}: {e}", invocation)
    try:
        os.execv(runtime, [runtime, *args])
    except OSError as e:
        return fail(f"cannot run the OCI runtime {runtime}: {e.strerror}", invocation)
    return 1  # not reached: execv does not return


# --- the real runtime --------------------------------------------------------------------------


def configured_runtime(env: Mapping[str, str]) -> str | None:
    """The config's `runtime`, read without the hook's config module (every call pays for
    imports). A missing or broken file means the default: the hook reports a broken file
    at the next create that needs it, and kill/delete of running containers keep working."""
    path = env.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(MAX_CONFIG_BYTES))
    except (OSError, ValueError, RecursionError):
        return None
    value = doc.get("runtime") if isinstance(doc, dict) else None
    return value if isinstance(value, str) and value else None


def resolve_runtime(name: str | None, search_path: str, own: str) -> str:
    """The runtime's absolute path: `name` (a path, or looked up on PATH), else runc or crun."""
    for candidate in (name,) if name else DEFAULT_RUNTIMES:
        found = _find_executable(candidate, search_path)
        if found is None:
            continue
        if os.path.realpath(found) == own:
            raise RuntimeNotFound(
                f"the runtime {found} is {PROG} itself; set the config's runtime to the real one "
                "(runc, crun or a path)"
            )
        return found
    if name:
        raise RuntimeNotFound(f"the configured runtime {name!r} is not an executable file (PATH={search_path})")
    raise RuntimeNotFound(
        f"no OCI runtime found: neither runc nor crun is on PATH ({search_path}); install one "
        "or set the config's runtime"
    )


def _find_executable(name: str, search_path: str) -> str | None:
    candidates = [name] if "/" in name else [os.path.join(d or ".", name) for d in search_path.split(os.pathsep)]
    for path in candidates:
        if os.path.isabs(path) and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


# --- the bundle ----------------------------------------------------------------------------------


def hook_path(own: str) -> str:
    """This installation's hook: the packages' /usr/libexec/oci/hooks.d/oci-portfwd-hook next
    to /usr/bin, else the console script in the wrapper's own bin dir (a venv, pip)."""
    bindir = os.path.dirname(own)
    candidates = (
        os.path.join(os.path.dirname(bindir), "libexec", "oci", "hooks.d", HOOK_NAME),
        os.path.join(bindir, HOOK_NAME),
    )
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise BundleError(f"cannot find {HOOK_NAME} next to {own} (looked for {' and '.join(candidates)}); reinstall")


def prepare_bundle(invocation: Invocation, env: Mapping[str, str], own: str) -> bool:
    """Add the hook to the bundle's spec when the container requests ports. True if the spec
    was rewritten."""
    path = invocation.spec_path
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
            st = os.fstat(f.fileno())
    except OSError as e:
        raise BundleError(f"cannot read the bundle's spec {path}: {e.strerror}") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise BundleError(f"the bundle's spec {path} is larger than {MAX_SPEC_BYTES} bytes")
    if ANNOTATION_PREFIX.encode() not in raw and ENV_PREFIX.encode() not in raw:
        return False  # the common case, decided without parsing
    try:
        spec = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise BundleError(f"the bundle's spec {path} is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise BundleError(f"the bundle's spec {path} is not a JSON object")
    requests = requested_annotations(spec)
    if not requests.get(PORTS_ANNOTATION, "").strip() or carries_our_hook(spec) or _cri_pod_member(spec):
        return False
    check_requests(requests, invocation, env)
    hook = hook_path(own)
    annotations = spec.get("annotations")
    spec["annotations"] = {**requests, **(annotations if isinstance(annotations, dict) else {})}
    hooks = spec.get("hooks")
    if not isinstance(hooks, dict):
        hooks = {}
    for stage in ("prestart", "poststop"):
        entries = hooks.get(stage)
        hooks[stage] = [*(entries if isinstance(entries, list) else []), {"path": hook, "args": [HOOK_NAME, stage]}]
    spec["hooks"] = hooks
    write_atomically(path, json.dumps(spec, separators=(",", ":")).encode(), st)
    return True


def requested_annotations(spec: Mapping[str, Any]) -> dict[str, str]:
    """Our annotations, and the env variables of process.env mapped onto the ones the hook
    knows (an annotation wins over the env variable of the same name)."""
    from .plan import KNOWN_ANNOTATIONS  # noqa: PLC0415 - only once the spec mentions us

    found: dict[str, str] = {}
    process = spec.get("process")
    variables = process.get("env") if isinstance(process, dict) else None
    for item in variables if isinstance(variables, list) else []:
        if isinstance(item, str) and item.startswith(ENV_PREFIX) and "=" in item:
            name, _, value = item.partition("=")
            key = ANNOTATION_PREFIX + name[len(ENV_PREFIX) :].lower().replace("_", "-")
            if key in KNOWN_ANNOTATIONS:
                found[key] = value
    annotations = spec.get("annotations")
    if isinstance(annotations, dict):
        found.update(
            (k, v) for k, v in annotations.items() if isinstance(v, str) and k.startswith(ANNOTATION_PREFIX)
        )
    return found


def carries_our_hook(spec: Mapping[str, Any]) -> bool:
    """True when any stage already runs an oci-portfwd-hook (hooks.d, or a spec written by
    hand): a second one would forward the same ports twice."""
    hooks = spec.get("hooks")
    if not isinstance(hooks, dict):
        return False
    for entries in hooks.values():
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, dict):
                continue
            args = entry.get("args")
            names = [entry.get("path"), args[0] if isinstance(args, list) and args else None]
            if any(isinstance(n, str) and os.path.basename(n) == HOOK_NAME for n in names):
                return True
    return False


def _cri_pod_member(spec: Mapping[str, Any]) -> bool:
    annotations = spec.get("annotations")
    return isinstance(annotations, dict) and annotations.get(CRI_CONTAINER_TYPE) == "container"


def check_requests(requests: Mapping[str, str], invocation: Invocation, env: Mapping[str, str]) -> None:
    """What the hook would refuse at prestart, refused now, before the runtime starts: the
    config, the port specs (the hook's own parser), the policy and the driver's name."""
    from .config import load_config  # noqa: PLC0415
    from .errors import ConfigError, DriverError, quoted  # noqa: PLC0415
    from .hostnet import refuse_unless_host_netns  # noqa: PLC0415
    from .plan import DRIVER_ANNOTATION, make_plan  # noqa: PLC0415
    from .schema import validate  # noqa: PLC0415
    from .state import ContainerState  # noqa: PLC0415

    refuse_unless_host_netns()
    config = load_config(env)
    state = ContainerState("", invocation.container_id, "creating", 1, invocation.bundle, requests)
    plan = make_plan(state, requests, config)
    try:
        # The config's enum of drivers (the drivers package would cost ~25 ms of imports).
        validate({"driver": plan.driver}, "config.schema.json", "driver", ConfigError)
    except ConfigError as e:
        known = str(e).rpartition(": ")[2]
        raise DriverError(f"annotation {DRIVER_ANNOTATION}={quoted(plan.driver)}: {known}") from None


def write_atomically(path: str, data: bytes, like: os.stat_result) -> None:
    """Replace `path` by a file of the same mode and owner: a reader (the runtime, an engine)
    sees the old spec or the new one, never half of it."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{PROG}-{os.getpid()}")
    mode = like.st_mode & 0o7777
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except OSError as e:
        raise BundleError(f"cannot write next to the bundle's spec {path}: {e.strerror}") from None
    try:
        try:
            os.fchmod(fd, mode)  # not narrowed by the umask
            if (like.st_uid, like.st_gid) != (os.geteuid(), os.getegid()):
                os.fchown(fd, like.st_uid, like.st_gid)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise BundleError(f"cannot rewrite the bundle's spec {path}: {e.strerror}") from None


# --- errors the engine shows ---------------------------------------------------------------------


def fail(message: str, invocation: Invocation) -> int:
    """One line on stderr and in the runtime log: containerd's shim turns the log's last error
    into "OCI runtime create failed: <message>", which dockerd, ctr and nerdctl print."""
    line = f"{PROG}: {message}"
    print(line, file=sys.stderr)
    log = invocation.options.get("log")
    if log:
        try:
            with open(log, "a", encoding="utf-8") as f:
                f.write(log_record(line, invocation.options.get("log-format", "text")))
        except OSError:
            pass
    return 1


def log_record(message: str, log_format: str) -> str:
    import time  # noqa: PLC0415 - errors only

    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if log_format == "json":
        return json.dumps({"level": "error", "msg": message, "time": now}) + "\n"
    return f"time={json.dumps(now)} level=error msg={json.dumps(message)}\n"
