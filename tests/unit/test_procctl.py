"""procctl: python-prctl's C module without its prctl.py, against prctl.py itself."""

import os

import prctl
import pytest
from oci_portfwd import procctl

CAP_NET_ADMIN = 12
CAP_NET_RAW = 13


def test_all_caps_are_prctl_py_s():
    assert sorted(set(prctl.ALL_CAPS)) == list(procctl.ALL_CAPS)


def test_reads_agree_with_prctl_py():
    for cap in procctl.ALL_CAPS:
        assert procctl.has_cap(cap, procctl.PERMITTED) == bool(prctl.get_caps((cap, prctl.CAP_PERMITTED))[prctl.CAP_PERMITTED][cap])
        assert procctl.has_cap(cap, procctl.EFFECTIVE) == bool(prctl.get_caps((cap, prctl.CAP_EFFECTIVE))[prctl.CAP_EFFECTIVE][cap])
        assert procctl.in_bounding_set(cap) == bool(prctl.capbset_read(cap))
    assert procctl.get_securebits() == prctl.get_securebits()


def _in_child(body):
    """Run body in a forked child (capabilities and names are the process's); its assertion
    errors come back as the exit code and message."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            body()
            os.write(w, b"ok")
        except BaseException as e:  # noqa: BLE001
            os.write(w, repr(e).encode()[:4000])
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        said = f.read().decode()
    os.waitpid(pid, 0)
    assert said == "ok"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root's capabilities to drop some")
def test_set_caps_changes_several_sets_at_once_and_bounding_set_drops():
    def body():
        assert procctl.has_cap(CAP_NET_ADMIN, procctl.PERMITTED)
        # Permitted and effective in one capset: clearing permitted alone would fail while
        # effective still holds the capability.
        procctl.set_caps((procctl.PERMITTED, [CAP_NET_RAW], False), (procctl.EFFECTIVE, [CAP_NET_RAW], False))
        assert not procctl.has_cap(CAP_NET_RAW, procctl.PERMITTED)
        assert not procctl.has_cap(CAP_NET_RAW, procctl.EFFECTIVE)
        procctl.set_caps((procctl.EFFECTIVE, [CAP_NET_ADMIN], False))
        assert procctl.has_cap(CAP_NET_ADMIN, procctl.PERMITTED)
        assert not procctl.has_cap(CAP_NET_ADMIN, procctl.EFFECTIVE)
        procctl.set_caps((procctl.EFFECTIVE, [CAP_NET_ADMIN], True))
        assert procctl.has_cap(CAP_NET_ADMIN, procctl.EFFECTIVE)
        procctl.set_caps((procctl.INHERITABLE, [CAP_NET_ADMIN], True))
        assert procctl.has_cap(CAP_NET_ADMIN, procctl.INHERITABLE)
        assert procctl.in_bounding_set(CAP_NET_RAW)
        procctl.drop_from_bounding_set(CAP_NET_RAW)
        assert not procctl.in_bounding_set(CAP_NET_RAW)
        assert procctl.in_bounding_set(CAP_NET_ADMIN)

    _in_child(body)


def test_name_dumpable_pdeathsig_no_new_privs():
    def body():
        procctl.set_name("procctl-test")
        with open("/proc/self/comm") as f:
            assert f.read() == "procctl-test\n"
        procctl.set_dumpable(False)
        assert prctl.get_dumpable() == 0
        procctl.set_pdeathsig(9)
        assert prctl.get_pdeathsig() == 9
        procctl.set_no_new_privs()
        assert prctl.get_no_new_privs() == 1
        procctl.set_child_subreaper()
        assert prctl.get_child_subreaper() == 1

    _in_child(body)
