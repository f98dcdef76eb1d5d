"""prctl(2) and capability sets, through python-prctl's C module (_prctl) alone.

Its prctl.py generates a function per prctl option and a property per capability when it is
imported: 128 KiB of every core's memory against _prctl's 40, and 1.3 ms of each import (issue
12, measured with smaps and -X importtime). These are the calls the hook's processes make.
"""

from __future__ import annotations

import _prctl

EFFECTIVE = _prctl.CAP_EFFECTIVE
PERMITTED = _prctl.CAP_PERMITTED
INHERITABLE = _prctl.CAP_INHERITABLE
SETS = (EFFECTIVE, PERMITTED, INHERITABLE)  # the order of _prctl's lists
# Every capability python-prctl can name or set: 0 to the last one it was built with (prctl.py's
# ALL_CAPS holds the same numbers; newer ones it refuses).
ALL_CAPS = tuple(range(_prctl.CAP_LAST_CAP + 1))


def set_name(name: str) -> None:
    _prctl.prctl(_prctl.PR_SET_NAME, name)


def set_dumpable(dumpable: bool) -> None:
    _prctl.prctl(_prctl.PR_SET_DUMPABLE, int(dumpable))


def set_pdeathsig(signal: int) -> None:
    _prctl.prctl(_prctl.PR_SET_PDEATHSIG, signal)


def set_no_new_privs() -> None:
    _prctl.prctl(_prctl.PR_SET_NO_NEW_PRIVS, 1)


def set_child_subreaper() -> None:
    _prctl.prctl(_prctl.PR_SET_CHILD_SUBREAPER, 1)


def get_securebits() -> int:
    return int(_prctl.prctl(_prctl.PR_GET_SECUREBITS))


def set_securebits(bits: int) -> None:
    _prctl.prctl(_prctl.PR_SET_SECUREBITS, bits)


def in_bounding_set(cap: int) -> bool:
    return bool(_prctl.prctl(_prctl.PR_CAPBSET_READ, cap))


def drop_from_bounding_set(cap: int) -> None:
    _prctl.prctl(_prctl.PR_CAPBSET_DROP, cap)


def has_cap(cap: int, which: int) -> bool:
    """Whether `cap` is in this process's `which` set (EFFECTIVE, PERMITTED, INHERITABLE)."""
    return bool(_prctl.get_caps(*([cap] if w == which else [] for w in SETS))[which][cap])


def set_caps(*changes: tuple[int, list[int] | tuple[int, ...], bool]) -> None:
    """(set, capabilities, raise or clear) for each change, in one capset(2): clearing a
    capability from the permitted set alone fails while the effective set still holds it."""
    lists: dict[tuple[int, bool], list[int]] = {(w, v): [] for w in SETS for v in (True, False)}
    for which, caps, value in changes:
        lists[(which, value)].extend(caps)
    _prctl.set_caps(*(lists[(w, v)] for v in (True, False) for w in SETS))
