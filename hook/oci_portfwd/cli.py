"""oci-portfwd-hook: the command line.

    oci-portfwd-hook prestart|createRuntime     (runtime: OCI state on stdin)
    oci-portfwd-hook poststop                   (runtime: OCI state on stdin)
    oci-portfwd-hook auto                       (stage from the state's status: a hooks.d
                                                 file gives every stage the same args)
    oci-portfwd-hook check-config [FILE]
    oci-portfwd-hook ps
    oci-portfwd-hook --version
"""

from __future__ import annotations

import os
import sys

from . import __version__
from .errors import PortfwdError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

USAGE = """usage: oci-portfwd-hook prestart|createRuntime|poststop|auto   (OCI state JSON on stdin)
       oci-portfwd-hook check-config [FILE]
       oci-portfwd-hook ps
       oci-portfwd-hook COMMAND --help
       oci-portfwd-hook --version"""
MAX_STDIN = (1 << 20) + 1
MAX_DRAIN = 64 << 20  # read past an over-large state at most (a writer that never stops)
STAGE_HELP = """usage: oci-portfwd-hook {stage}   (OCI state JSON on stdin)
Run by an OCI runtime (config.json hooks, or a hooks.d file), not by people.
  prestart, createRuntime: bind the ports of the annotation io.oci-portfwd.ports and
                           start the forwarding; fail the start on any error
  poststop:                stop the container's forwarding and free its ports
  auto:                    the stage from the state's status (creating/created: prestart,
                           stopped: poststop), for hooks.d files
Config: /etc/containers/oci-portfwd.json or $OCI_PORTFWD_CONFIG. See oci-portfwd-hook(1)."""
HELP = {
    "check-config": """usage: oci-portfwd-hook check-config [FILE]
Validate the config (FILE, else $OCI_PORTFWD_CONFIG, else /etc/containers/oci-portfwd.json)
against its schema and print the effective values, the state dir included.""",
    "ps": """usage: oci-portfwd-hook ps
List the forwarded containers of the caller's state dir: container id (as long as needed to
tell them apart) and the engine's name for it, driver, supervisor pid, status (up, stale,
or damaged with the reason), TCP connections open/total, bytes each way, ports.""",
    **{stage: STAGE_HELP.format(stage=stage) for stage in ("prestart", "createRuntime", "poststop", "auto")},
}

EXIT_USER_ERROR = 1
EXIT_BUG = 2
EXIT_USAGE = 64


HOOK_STAGES = ("prestart", "createRuntime", "poststop", "auto")


def main(argv: Sequence[str] | None = None) -> int:
    """The exit code: the console script and /usr/libexec's script both sys.exit() it.
    A hook stage run from the command line does not return: see _exit_now."""
    args = list(sys.argv[1:] if argv is None else argv)
    code = run(args)
    if argv is None and args and args[0] in HOOK_STAGES:
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """Exit without the interpreter's teardown: the runtime waits for this process, and
    freeing every object and module costs a start and a delete ~3 ms each (issue 12).
    Nothing is pending but stdout and stderr: every file the stages write is closed by
    then (the log in a finally), and the supervisor is a process of its own."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def run(args: list[str]) -> int:
    # crun runs hooks with nearly every signal blocked, and a blocked mask is inherited by
    # fork and kept across exec: the supervisor, the core and slirp4netns/pasta would never
    # see SIGTERM or their death signal (every stop then waited for a SIGKILL).
    # _signal: the signal module's enums (enum, ~1.5 ms) are not needed for this.
    import _signal  # noqa: PLC0415

    _signal.pthread_sigmask(_signal.SIG_SETMASK, set())
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, file=sys.stdout if args else sys.stderr)
        return 0 if args else EXIT_USAGE
    command, rest = args[0], args[1:]
    if command in HELP and any(a in ("-h", "--help") for a in rest):
        print(HELP[command])
        return 0
    try:
        if command == "--version":
            print(f"oci-portfwd-hook {__version__}")
            return 0
        if command in HOOK_STAGES:
            raw = _read_stdin(command)
            if command == "auto":
                command = stage_from_status(raw)
            if command == "poststop":
                from .poststop import poststop  # noqa: PLC0415

                return poststop(raw, os.environ)
            from .prestart import prestart  # noqa: PLC0415

            return prestart(raw, os.environ)
        if command == "check-config" and len(rest) <= 1:
            return _check_config(rest)
        if command == "ps" and not rest:
            return _ps()
        if command in HELP:
            _say(f"{command}: unexpected arguments {' '.join(rest)!r}\n{HELP[command]}")
            return EXIT_USAGE
    except PortfwdError as e:
        _say(f"{command}: {e}")
        return EXIT_USER_ERROR
    except Exception:  # noqa: BLE001 - a bug: one line for the user, the traceback for us
        import traceback  # noqa: PLC0415 - only for bugs: keeps the start path light

        _say(f"{command}: internal error (a bug, please report it): {traceback.format_exc(limit=-1).strip().splitlines()[-1]}")
        if os.environ.get("OCI_PORTFWD_DEBUG"):
            traceback.print_exc(file=sys.stderr)
        return EXIT_BUG
    _say(f"unknown command {command!r}\n{USAGE}")
    return EXIT_USAGE


def stage_from_status(raw: bytes) -> str:
    from .state import decode_state  # noqa: PLC0415

    status = decode_state(raw).get("status")
    if status in ("creating", "created"):
        return "prestart"
    if status == "stopped":
        return "poststop"
    raise PortfwdError(
        f"cannot tell the hook stage from the state's status {status!r}; "
        "name the stage (prestart or poststop) as the argument"
    )


def _read_stdin(command: str) -> bytes:
    if sys.stdin is None or sys.stdin.isatty():
        raise PortfwdError(f"{command} expects the OCI state JSON on stdin (it is run by an OCI runtime)")
    raw = sys.stdin.buffer.read(MAX_STDIN)
    if len(raw) == MAX_STDIN:
        # Too large (decode_state says so): read the rest anyway. A runtime that writes the
        # state after we stopped reading gets SIGPIPE, and crun before 1.17 dies of it (crun
        # issue 1551): a failed `delete` with no word of why, instead of our message.
        drained = 0
        while drained < MAX_DRAIN and (chunk := os.read(0, 1 << 16)):
            drained += len(chunk)
    return raw


def _say(message: str) -> None:
    lines = message.split("\n")
    print(f"oci-portfwd-hook: {lines[0]}", file=sys.stderr)
    for line in lines[1:]:
        print(line, file=sys.stderr)


def _check_config(rest: list[str]) -> int:
    import json  # noqa: PLC0415

    from .config import config_path, load_config, state_dir_of  # noqa: PLC0415

    explicit = rest[0] if rest else None
    from .privileges import core_identity  # noqa: PLC0415

    config = load_config(os.environ, explicit, thorough=True)
    core_identity(config.core_user)  # rootful: a user this host lacks would fail every start
    path, _ = config_path(os.environ, explicit)
    where = config.source if config.source != "built-in defaults" else f"{path} absent: built-in defaults"
    print(f"config OK ({where})")
    keys = ("driver", "loopback", "source_address", "udp_idle_timeout", "max_ports", "ready_timeout", "log_level", "allow_host_loopback", "core_user")
    for key in keys:
        value = getattr(config, key)
        # As JSON writes it: the config's 2 stays 2 (not 2.0), false stays false.
        print(f"  {key}: {value if isinstance(value, str) else json.dumps(value)}")
    print(f"  state_dir: {state_dir_of(config, os.environ)}")
    print(f"  runtime: {_runtime_line(config.runtime)}")
    return 0


def _runtime_line(configured: str | None) -> str:
    from .runtime_wrapper import RuntimeNotFound, resolve_runtime  # noqa: PLC0415

    search_path = os.environ.get("PATH", os.defpath)
    try:
        found = resolve_runtime(configured, search_path, own="")
    except RuntimeNotFound as e:
        found = f"NOT FOUND ({e})"
    return f"{configured or 'default: runc, else crun'} -> {found} (oci-portfwd-runtime, with this PATH)"


def _ps() -> int:
    from .config import load_config, state_dir_of  # noqa: PLC0415
    from .statefile import Damaged, is_alive, list_records  # noqa: PLC0415

    state_dir = state_dir_of(load_config(os.environ), os.environ)
    records = list_records(state_dir)
    if not records:
        print(f"no forwarded containers (state dir {state_dir})")
        return 0
    width = max(9, id_width([r.container_id for r in records]))
    print(
        f"{'CONTAINER':<{width}} {'NAME':<16} {'DRIVER':<11} {'PID':>7} {'STATUS':<7} "
        f"{'CONNS':>11} {'IN':>9} {'OUT':>9}  PORTS"
    )
    for r in records:
        cid = _printable(r.container_id[:width])
        if isinstance(r, Damaged):
            reason = _printable(r.reason)
            print(f"{cid:<{width}} {'-':<16} {'-':<11} {'-':>7} {'damaged':<7} {'-':>11} {'-':>9} {'-':>9}  {reason}")
            continue
        status = "up" if is_alive(r) else "stale"
        s = r.stats or {}
        conns = f"{s.get('tcp_open', 0)}/{s.get('tcp_total', 0)}" if r.stats else "-"
        print(
            f"{cid:<{width}} {r.name or '-':<16} {r.driver:<11} {r.supervisor_pid:>7} {status:<7} {conns:>11} "
            f"{_size(s.get('bytes_to_container')):>9} {_size(s.get('bytes_to_client')):>9}  {_printable(', '.join(r.ports))}"
        )
    print("CONNS: TCP open/total; IN: bytes to the container, OUT: bytes to clients (builtin relay only)")
    return 0


def _printable(text: str) -> str:
    # File names in the state dir become rows: a newline in one must not forge another row.
    return "".join(c if c.isprintable() else "?" for c in text)


def id_width(ids: list[str], shortest: int = 12) -> int:
    """The shortest prefix length, at least `shortest`, that tells every id apart."""
    width = shortest
    while len({i[:width] for i in ids}) < len(set(ids)):
        width += 1
    return width


def _size(count: int | None) -> str:
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}TiB"
