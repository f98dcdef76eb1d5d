"""The hook's start and stop paths do without json, dataclasses, logging and pathlib (issue 12):
what replaces them behaves as they did, and they stay off those paths."""

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from oci_portfwd.errors import loads_strict
from oci_portfwd.logs import FORMAT, HookLog, format_line
from oci_portfwd.plan import Plan
from oci_portfwd.ports import PortMapping
from oci_portfwd.statefile import Record, read_record, write_record

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
    assert record.with_stats({"tcp_open": 2}).stats == {"tcp_open": 2} and record.stats == {"tcp_open": 1}


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


@pytest.mark.parametrize("module", ["oci_portfwd.prestart", "oci_portfwd.poststop"])
def test_start_and_stop_paths_import_none_of_the_heavy_modules(module):
    code = (f"import sys; import oci_portfwd.cli, {module}; "
            "print(' '.join(m for m in ('json', 'dataclasses', 'logging', 'pathlib', 'inspect', 'typing', "
            "'decimal', 'importlib.util', 'prctl', 'enum', 're', 'socket') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(HOOK)}
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            check=True, timeout=60).stdout.split()
    allowed = {"enum", "re", "socket"} if module.endswith("prestart") else set()
    assert set(loaded) <= allowed, f"{module} imports {sorted(set(loaded) - allowed)}"


def test_format_line_is_local_time():
    now = time.time()
    assert format_line("INFO", "m", now).startswith(time.strftime("%Y-%m-%d %H:%M", time.localtime(now)))
