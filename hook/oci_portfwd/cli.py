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
import signal
import sys
from collections.abc import Sequence

from . import __version__
from .errors import PortfwdError

USAGE = """usage: oci-portfwd-hook prestart|createRuntime|poststop|auto   (OCI state JSON on stdin)
       oci-portfwd-hook check-config [FILE]
       oci-portfwd-hook ps
       oci-portfwd-hook --version"""
MAX_STDIN = (1 << 20) + 1

EXIT_USER_ERROR = 1
EXIT_BUG = 2
EXIT_USAGE = 64


def main(argv: Sequence[str] | None = None) -> int:
    """The exit code: the console script and /usr/libexec's script both sys.exit() it."""
    args = list(sys.argv[1:] if argv is None else argv)
    return run(args)


def run(args: list[str]) -> int:
    # crun runs hooks with nearly every signal blocked, and a blocked mask is inherited by
    # fork and kept across exec: the supervisor, the core and slirp4netns/pasta would never
    # see SIGTERM or their death signal (every stop then waited for a SIGKILL).
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, file=sys.stdout if args else sys.stderr)
        return 0 if args else EXIT_USAGE
    command, rest = args[0], args[1:]
    try:
        if command == "--version":
            print(f"oci-portfwd-hook {__version__}")
            return 0
        if command in ("prestart", "createRuntime", "poststop", "auto"):
            raw = _read_stdin(command)
            if command == "auto":
                command = stage_from_status(raw)
            if command == "poststop":
                from .poststop import poststop  # noqa: PLC0415

                return poststop(raw, os.environ)
            from .prestart import prestart  # noqa: PLC0415

            return prestart(raw, os.environ)
        if command == "check-config":
            return _check_config(rest)
        if command == "ps":
            return _ps()
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
    return sys.stdin.buffer.read(MAX_STDIN)


def _say(message: str) -> None:
    lines = message.split("\n")
    print(f"oci-portfwd-hook: {lines[0]}", file=sys.stderr)
    for line in lines[1:]:
        print(line, file=sys.stderr)


def _check_config(rest: list[str]) -> int:
    from .config import config_path, load_config, state_dir_of  # noqa: PLC0415

    explicit = rest[0] if rest else None
    from .privileges import core_identity  # noqa: PLC0415

    config = load_config(os.environ, explicit, thorough=True)
    core_identity(config.core_user)  # rootful: a user this host lacks would fail every start
    path, _ = config_path(os.environ, explicit)
    where = config.source if config.source != "built-in defaults" else f"{path} absent: built-in defaults"
    print(f"config OK ({where})")
    for key in ("driver", "loopback", "udp_idle_timeout", "max_ports", "ready_timeout", "log_level", "core_user"):
        print(f"  {key}: {getattr(config, key)}")
    print(f"  state_dir: {state_dir_of(config, os.environ)}")
    return 0


def _ps() -> int:
    from .config import load_config, state_dir_of  # noqa: PLC0415
    from .statefile import is_alive, list_records  # noqa: PLC0415

    state_dir = state_dir_of(load_config(os.environ), os.environ)
    records = list_records(state_dir)
    if not records:
        print(f"no forwarded containers (state dir {state_dir})")
        return 0
    print(f"{'CONTAINER':<20} {'DRIVER':<11} {'PID':>7} {'STATUS':<6} {'CONNS':>11} {'IN':>9} {'OUT':>9}  PORTS")
    for r in records:
        status = "up" if is_alive(r) else "stale"
        s = r.stats or {}
        conns = f"{s.get('tcp_open', 0)}/{s.get('tcp_total', 0)}" if r.stats else "-"
        print(
            f"{r.container_id[:20]:<20} {r.driver:<11} {r.supervisor_pid:>7} {status:<6} {conns:>11} "
            f"{_size(s.get('bytes_to_container')):>9} {_size(s.get('bytes_to_client')):>9}  {', '.join(r.ports)}"
        )
    print("CONNS: TCP open/total; IN: bytes to the container, OUT: bytes to clients (builtin relay only)")
    return 0


def _size(count: int | None) -> str:
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}TiB"
