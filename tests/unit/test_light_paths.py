"""The hook's start and stop paths do without json, dataclasses, logging and pathlib (issue 12):
what replaces them behaves as they did, and they stay off those paths."""

import ast
import ipaddress
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from oci_portfwd import patterns, validators
from oci_portfwd.errors import PortSpecError, StartError, loads_strict
from oci_portfwd.fdpass import recv_fds, send_fds
from oci_portfwd.inet import ipv4_unmapped, ipv6_text, is_loopback, packed
from oci_portfwd.logs import FORMAT, HookLog, format_line
from oci_portfwd.patterns import KNOWN
from oci_portfwd.plan import Plan
from oci_portfwd.ports import PortMapping, _is_plain_ipv4, _parse_address, is_interface_name
from oci_portfwd.privileges import check_seccomp_binding
from oci_portfwd.statefile import Record, parent_and_name, read_record, write_record

HOOK = Path(__file__).resolve().parents[2] / "hook"
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def _json_loads(raw):
    def reject(name):
        raise ValueError(f"{name} is not a JSON number")

    return json.loads(raw, parse_constant=reject)


def _outcome(fn, raw):
    try:
        return ("ok", repr(fn(raw)))
    except RecursionError:
        return ("RecursionError", "")
    except ValueError as e:
        return (type(e).__name__, str(e))


@given(JSON)
def test_loads_strict_reads_what_json_writes(doc):
    for text in (json.dumps(doc), json.dumps(doc, indent=1), f" \n{json.dumps(doc)}\t"):
        assert repr(loads_strict(text)) == repr(_json_loads(text))
        assert repr(loads_strict(text.encode())) == repr(_json_loads(text.encode()))


@pytest.mark.parametrize("raw", [
    b"", b" ", b"{", b'{"a": 1} x', b'{"a": NaN}', b"[Infinity]", b"-Infinity", b'\xef\xbb\xbf{"a": 1}',
    b'"\\ud800"', b'{"a": 1, "a": 2}', "{}".encode("utf-16"), b"\xff", b"[" * 100_000, b"01", b"1e999",
])
def test_loads_strict_fails_and_succeeds_as_json_did(raw):
    assert _outcome(loads_strict, raw) == _outcome(_json_loads, raw)


def test_value_classes_compare_hash_and_replace_like_frozen_dataclasses():
    m = PortMapping("127.0.0.1", 8080, 80, "tcp")
    same = PortMapping("127.0.0.1", 8080, 80, "tcp", proxy=False)
    assert m == same and hash(m) == hash(same) and len({m, same}) == 1
    assert m != PortMapping("127.0.0.1", 8080, 80, "udp")
    moved = m.replace(host_ip="0.0.0.0")
    assert (moved.host_ip, moved.host_port, m.host_ip) == ("0.0.0.0", 8080, "127.0.0.1")
    assert repr(m) == "PortMapping(host_ip='127.0.0.1', host_port=8080, container_port=80, proto='tcp', proxy=False)"
    plan = Plan("c", 1, "builtin", "preserve", (m,), 60, 10)
    assert plan.replace(mappings=()).mappings == () and plan.mappings == (m,)
    with pytest.raises(TypeError):
        m.replace(nonsense=1)


def test_state_file_round_trip_and_json(tmp_path):
    record = Record(container_id="c1", container_pid=5, supervisor_pid=6, supervisor_start_time=7,
                    driver="builtin", ports=("8080:80/tcp", 'a"b\\c\u00e9\n'), log=str(tmp_path / "c1.log"),
                    created=1234.5, stats={"tcp_open": 1}, name=None)
    write_record(str(tmp_path), record)
    text = (tmp_path / "c1.json").read_text()
    assert json.loads(text) == {**record.as_dict(), "ports": list(record.ports)}
    assert read_record(str(tmp_path), "c1") == record


def test_hook_log_lines_are_logging_s(tmp_path, capsys):
    when = 1_700_000_000.25
    expected = logging.Formatter(FORMAT).format(logging.makeLogRecord(
        {"levelname": "WARNING", "msg": "x 1", "created": when, "msecs": 250.0, "process": os.getpid()}))
    assert format_line("WARNING", "x 1", when) == expected
    path = tmp_path / "c.log"
    log = HookLog(str(path), "info", stderr=True)
    log.debug("hidden %d", 1)
    log.info("said %s", "this")
    log.warning("careful %d", 2)
    log.error("broke")
    log.close()
    lines = path.read_text().splitlines()
    assert [line.split(" ", 3)[3] for line in lines] == ["INFO said this", "WARNING careful 2", "ERROR broke"]
    assert capsys.readouterr().err == "oci-portfwd-hook: WARNING: careful 2\n"


HEAVY = ("json", "dataclasses", "logging", "pathlib", "inspect", "typing", "decimal", "importlib.util",
         "prctl", "enum", "re", "socket", "signal", "selectors", "functools", "collections", "ipaddress",
         "ctypes", "struct", "fcntl")


@pytest.mark.parametrize("module", ["oci_portfwd.prestart", "oci_portfwd.poststop"])
def test_start_and_stop_paths_import_none_of_the_heavy_modules(module):
    code = (f"import sys; import oci_portfwd.cli, {module}; "
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(HOOK)}
    # -I -S: what site imports (a .pth's modules) is not the hook's doing.
    loaded = subprocess.run([sys.executable, "-I", "-S", "-c", code.replace("import sys;", f"import sys; sys.path.insert(0, {str(HOOK)!r});")],
                            capture_output=True, text=True, env=env, check=True, timeout=60).stdout.split()
    assert not loaded, f"{module} imports {loaded}"


def test_what_prestart_runs_imports_none_of_the_heavy_modules(tmp_path):
    """Not only the imports at the top: what parsing, validating (the schemas' patterns),
    planning and binding import on the way, with a host address in the port spec."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free a moment ago; bound again (and closed) below
    raw = json.dumps({"ociVersion": "1.0.2", "id": "c1", "status": "creating", "pid": 1, "bundle": str(bundle),
                      "annotations": {"io.oci-portfwd.ports": f"127.0.0.1:{port}:80"}}).encode()
    config = tmp_path / "oci-portfwd.json"
    # Every pattern of the config's schema on the way (state_dir, runtime, core_user).
    config.write_text(json.dumps({"state_dir": str(tmp_path / "state"), "runtime": "runc", "core_user": "nobody"}))
    code = f"""
import sys
sys.path.insert(0, {str(HOOK)!r})
from oci_portfwd.config import load_config
from oci_portfwd.listeners import bind_all, bind_targets, ipv6_available
from oci_portfwd.drivers import get_driver
from oci_portfwd.plan import make_plan
from oci_portfwd.state import parse_state
from oci_portfwd.statefile import prepare_state_dir
state = parse_state({raw!r}, full_validation=True)
config = load_config({{"OCI_PORTFWD_CONFIG": {str(config)!r}}})
prepare_state_dir({str(tmp_path / "state")!r})
plan = make_plan(state, dict(state.annotations), config)
plan = get_driver(plan.driver).check(plan, print)
for listener in bind_all(bind_targets(plan.mappings, ipv6_available(), print)):
    listener.close()
print("LOADED", " ".join(m for m in {HEAVY!r} if m in sys.modules))
"""
    run = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True,
                         check=False, timeout=60)
    assert run.returncode == 0, run.stderr
    loaded = run.stdout.split("LOADED", 1)[1].split()
    assert not loaded, f"prestart's work imports {loaded}"


def test_format_line_is_local_time():
    now = time.time()
    assert format_line("INFO", "m", now).startswith(time.strftime("%Y-%m-%d %H:%M", time.localtime(now)))


@pytest.mark.parametrize("source", sorted(KNOWN))
@given(text=st.text(alphabet=st.sampled_from("aZ09_.-+$/:@\\\x00 \n\u00e9\u0661"), max_size=300) | st.text())
def test_written_out_patterns_match_as_re_does(source, text):
    assert bool(patterns.compile(source).search(text)) == bool(re.compile(source).search(text))


def test_every_schema_pattern_is_written_out():
    # A new pattern works through re (compiled when first searched), but puts re back on the path.
    for table in (validators.validate_config_REGEX_PATTERNS, validators.validate_oci_state_REGEX_PATTERNS):
        for pattern in table.values():
            assert pattern.source in KNOWN, f"{pattern.source!r}: add it to patterns.KNOWN"
    unknown = patterns.compile("^a+b\\Z")
    assert unknown.search("aab") and not unknown.search("ab c")


@given(st.ip_addresses(v=4).map(str) | st.text(alphabet="0123456789.", max_size=16))
def test_plain_ipv4_fast_path_is_what_ipaddress_returns(text):
    if _is_plain_ipv4(text):
        assert str(ipaddress.ip_address(text)) == text


def _as_ipaddress_reads(text):
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return "is not an IP address"
    scope = getattr(address, "scope_id", None)
    if address.version == 6 and address.is_link_local and not scope:
        return "is a link-local address"
    if scope is not None and not is_interface_name(scope):
        return "is not an interface name"
    return str(address)


def _as_we_read(text):
    try:
        return _parse_address("spec", text)
    except PortSpecError as e:
        return next(words for words in ("is not an IP address", "is a link-local address",
                                        "is not an interface name") if words in str(e))


@given(st.ip_addresses(v=6).map(str) | st.ip_addresses(v=6).map(lambda a: a.exploded.upper())
       | st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}") | st.ip_addresses(v=4).map(lambda a: f"::{a}")
       | st.text(alphabet="0123456789abcdefABCDEF:.%", max_size=45),
       st.sampled_from(["", "%eth0", "%7", "%", "%a%b", "%a$b", "%" + "x" * 16]))
def test_port_spec_addresses_read_as_ipaddress_reads_them(text, scope):
    assert _as_we_read(text + scope) == _as_ipaddress_reads(text + scope)


@given(st.binary(min_size=16, max_size=16))
def test_ipv6_text_is_ipaddress_s(packed):
    assert ipv6_text(packed) == str(ipaddress.IPv6Address(packed))
    mapped = bytes(10) + b"\xff\xff" + packed[:4]
    assert ipv6_text(mapped) == str(ipaddress.IPv6Address(mapped))


@given(st.ip_addresses(), st.sampled_from(["", "%lo", "%2"]))
def test_inet_reads_addresses_as_ipaddress_does(address, scope):
    text = str(address) + (scope if address.version == 6 else "")
    assert packed(text) == address.packed
    assert is_loopback(text) == address.is_loopback
    mapped = getattr(address, "ipv4_mapped", None)
    assert ipv4_unmapped(address.packed) == (mapped or address).packed


def test_fdpass_is_socket_s_send_fds_and_recv_fds():
    with open(os.devnull) as a, open(__file__) as b:
        for sender, receiver in ((send_fds, socket.recv_fds), (socket.send_fds, recv_fds), (send_fds, recv_fds)):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            with ours, theirs:
                assert sender(ours, [b"S", b"t4"], [a.fileno(), b.fileno()]) == 3
                data, fds, flags, _ = receiver(theirs, 64, 4)
                assert data == b"St4" and len(fds) == 2 and flags == 0
                assert all(os.path.samestat(os.fstat(fd), os.fstat(f.fileno())) for fd, f in zip(fds, (a, b), strict=True))
                for fd in fds:
                    os.close(fd)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with ours, theirs, pytest.raises(BlockingIOError):
            recv_fds(theirs, 64, 1, socket.MSG_DONTWAIT)  # the flags reach recvmsg


def _loaded_after(statements: str, names: tuple[str, ...]) -> list[str]:
    """Which of `names` a fresh `python -I -S` holds after running `statements`."""
    code = (f"import sys; sys.path.insert(0, {str(HOOK)!r}); {statements}; "
            f"print(' '.join(m for m in {names!r} if m in sys.modules))")
    return subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True,
                          check=True, timeout=60).stdout.split()


def test_ipv6_port_specs_import_none_of_the_heavy_modules():
    loaded = _loaded_after("from oci_portfwd.ports import parse_port_specs; parse_port_specs("
                           "'[::1]:1:2,[fe80::1%lo]:3:4/udp,[::ffff:1.2.3.4]:5:6,[2001:DB8::0:1]:7:8')", HEAVY)
    assert not loaded, f"parsing IPv6 port specs imports {loaded}"


@pytest.mark.parametrize("path", ["/run/oci-portfwd", "/run/oci-portfwd/", "//run/x", "///run/x", "/", "//", "a",
                                  "a/b", "./a", "a/./b/", "/a/../b", "", ".", "/a//b", "x/.."])
def test_parent_and_name_are_pathlibs(path):
    p = Path(path)
    assert parent_and_name(path) == (str(p.parent), p.name)


def test_seccomp_binding_check_finds_one_or_says_what_to_install(monkeypatch, tmp_path):
    check_seccomp_binding()  # the venv has pyseccomp
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    with pytest.raises(StartError, match="libseccomp's Python binding is missing"):
        check_seccomp_binding()


# What the supervisor and the core keep for their whole life (issue 12: each module's objects
# are memory of every forwarded container). dataclasses brings inspect, ast and dis: ~0.9 MiB;
# logging, traceback (linecache, tokenize) and json keep re loaded: ~1.4 MiB.
LONG_LIVED_HEAVY = ("dataclasses", "inspect", "ast", "dis", "pathlib", "decimal", "logging", "traceback",
                    "linecache", "tokenize", "json", "re")


def test_the_core_s_modules_import_none_of_the_long_lived_heavy_ones():
    loaded = _loaded_after("import oci_portfwd.supervisor, oci_portfwd.core, oci_portfwd.core_process", LONG_LIVED_HEAVY)
    assert not loaded, f"the core's modules import {loaded}"


def _chained() -> None:
    try:
        {}["missing"]
    except KeyError as e:
        raise ValueError("while looking it up") from e


def test_format_exception_is_traceback_s_without_source_lines():
    import traceback

    from oci_portfwd.logs import format_exception

    def ours_failing():
        from oci_portfwd.errors import StartError

        raise StartError("the core did not start")

    for raise_it in (_chained, lambda: 1 / 0, ours_failing):
        try:
            raise_it()
        except Exception as e:  # noqa: BLE001
            ours = format_exception(e)
            theirs = "".join(traceback.format_exception(e))
            # traceback's lines, less its source lines (indented by four) and carets.
            expected = "".join(line + "\n" for line in theirs.splitlines()
                               if not line.startswith("    "))
            assert ours == expected


# What the long-lived Python processes of a forwarded container (the core, an interpreter of
# its own since core_process.py, and the Python dialer forked from it; the supervisor waits in
# portfwd-keeper, C, while the core serves) must never hold: each is ~0.2-0.5 MiB
# of every container's memory (issue 12). The C modules under them (_socket, _signal,
# _collections) are what the core uses instead.
CORE_FORBIDDEN = ("socket", "selectors", "enum", "signal", "ipaddress", "collections", "collections.abc",
                  "functools", "re", "typing", "dataclasses", "logging",
                  "prctl", "heapq")  # python-prctl's prctl.py (procctl.py: _prctl alone), heapq.py (_heapq)
# Imports inside functions of those processes' modules that run elsewhere or on no serving path.
NOT_IN_THE_CORE = {
    "pyroute2", "pyroute2.netlink.exceptions",  # forked children that exit (netns_setup, client_routing)
    "json",  # loads_strict's fallback: json's message for malformed input
    "importlib.machinery",  # check_seccomp_binding: when the import system's PathFinder is not found
    "ctypes",  # setns on Python < 3.12, the dialer right before its exec, the tests' sandbox probes
    "seccomp", "pyseccomp",  # the libseccomp binding: checked on its own below
}
# Modules the core imports whose functions run in the hook (the start path's tests above).
HOOK_SIDE = {"oci_portfwd.drivers", "oci_portfwd.ports", "oci_portfwd.config", "oci_portfwd.state", "oci_portfwd.plan"}
CORE_IMAGE = """
import sys
sys.path[:0] = {paths!r}
from oci_portfwd import core_process, handover, core  # what the core's interpreter runs
from oci_portfwd.drivers import builtin
for name, targets in {imports!r}.items():  # what their functions import on the way
    if name in sys.modules:
        for target in targets:
            __import__(target)
print("OURS", " ".join(m for m in {forbidden!r} if m in sys.modules))
from oci_portfwd.seccomp_filter import _library
_library()  # the libseccomp binding, which CoreSandbox.enter loads
print("BINDING", " ".join(m for m in {forbidden!r} if m in sys.modules))
"""


def _imports(statements, package):
    """Every import statement, those in functions too, except under `if TYPE_CHECKING:`."""
    for node in statements:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            yield from _imports(node.orelse, package)
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            yield (base + "." + node.module if node.module else base) if node.level else node.module
        for field in ("body", "orelse", "finalbody", "handlers"):
            yield from _imports(getattr(node, field, ()), package)


def _core_image(python, paths):
    imports = {}
    for path in sorted((HOOK / "oci_portfwd").rglob("*.py")):
        parts = path.relative_to(HOOK).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = ".".join(parts[:-1])
        if name not in HOOK_SIDE:
            imports[name] = sorted(set(_imports(ast.parse(path.read_text()).body, package)) - NOT_IN_THE_CORE)
    code = CORE_IMAGE.format(paths=[str(HOOK), *paths], imports=imports, forbidden=CORE_FORBIDDEN)
    run = subprocess.run([python, "-I", "-S", "-c", code], capture_output=True, text=True, check=False, timeout=60)
    assert run.returncode == 0, run.stderr
    ours, binding = (line.split()[1:] for line in run.stdout.splitlines())
    return ours, binding


def test_the_core_s_image_has_no_socket_signal_enum_ipaddress_or_collections():
    """After `import oci_portfwd.core_process, core`, and every import their functions make on the
    core's and the dialer's way (CoreSandbox.enter, start_dialer, run_core, ...): none of them."""
    import prctl

    ours, binding = _core_image(sys.executable, [os.path.dirname(prctl.__file__)])
    assert not ours, f"the core's modules import {ours}"
    # The venv's binding is pyseccomp (PyPI), imported with a stand-in for typing (seccomp_filter).
    assert not binding, f"the libseccomp binding brings {binding}"


def test_the_core_s_image_with_debian_s_libseccomp_binding():
    dist = "/usr/lib/python3/dist-packages"
    if not any(name.startswith("seccomp.") for name in os.listdir(dist)) or not os.path.exists(f"{dist}/prctl.py"):
        pytest.skip("Debian's python3-seccomp or python3-prctl is not installed")
    _ours, binding = _core_image("/usr/bin/python3", [dist])
    assert not binding, f"the core's image holds {binding}"


def test_podman_names_come_from_containers_json(tmp_path):
    from oci_portfwd.names import container_name

    userdata = tmp_path / "overlay-containers" / "abc" / "userdata"
    userdata.mkdir(parents=True)
    (tmp_path / "overlay-containers" / "containers.json").write_text(
        json.dumps([{"id": "other", "names": ["x"]}, {"id": "abc", "names": ["web\x1b", "alias"]}]))
    assert container_name("abc", {"io.container.manager": "libpod"}, str(userdata)) == "web?"
    (tmp_path / "overlay-containers" / "containers.json").write_text("[{")
    assert container_name("abc", {"io.container.manager": "libpod"}, str(userdata)) is None


@pytest.mark.parametrize("stand_in, typing_loaded", [("", False), ("_typing_stand_in = lambda: ModuleType('typing')", True)])
def test_pyseccomp_is_imported_without_typing_or_with_it_when_it_asks_for_more(stand_in, typing_loaded):
    import prctl

    code = f"""
import sys
sys.path[:0] = {[str(HOOK), os.path.dirname(prctl.__file__)]!r}
from types import ModuleType
from oci_portfwd import seccomp_filter
{stand_in.replace("_typing_stand_in", "seccomp_filter._typing_stand_in")}
lib = seccomp_filter._library()
assert lib.__name__ == "pyseccomp" and ("typing" in sys.modules) is {typing_loaded}, sorted(sys.modules)
assert seccomp_filter.syscall_name(0xC000003E, 257) == "openat"  # x86_64: resolve_syscall, cast
seccomp_filter._allow_list(lib, lib.NOTIFY, seccomp_filter.CORE_SYSCALLS)
"""
    run = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=60)
    if "No module named 'pyseccomp'" in run.stderr:
        pytest.skip("pyseccomp is not installed")
    assert run.returncode == 0, run.stderr
