"""The schemas' regular expressions without `re` on the container's start path (issue 12).

validators.py (generated) calls `re.compile(SOURCE)` for each pattern of the schemas and then
only `.search(text)`; the generator has it call `compile` here instead. The patterns the
schemas have today are plain character-class checks, written out below (~2 ms: `re` brings
enum, functools and collections along); any other pattern is compiled by `re` the first time
it is searched, so a new pattern in a schema works unchanged, only with `re` back on the path
(tests/unit/test_light_paths.py says so). A unit test checks each one against `re`, hypothesis
included.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_USER_FIRST = _ALNUM | {"_"}
_USER_REST = _ALNUM | frozenset("_.-")
_ID_REST = _ALNUM | frozenset("_.+-")


def _absolute(text: str) -> bool:
    return text.startswith("/")


def _path_or_name(text: str) -> bool:
    if "\0" in text:
        return False
    return text.startswith("/") or (text != "" and "/" not in text)


def _user_name(text: str) -> bool:
    if text.endswith("$"):
        text = text[:-1]
    return text != "" and text[0] in _USER_FIRST and all(c in _USER_REST for c in text[1:])


def _container_id(text: str) -> bool:
    return 0 < len(text) <= 256 and text[0] in _ALNUM and all(c in _ID_REST for c in text[1:])


# Keyed by the source validators.py compiles (fastjsonschema writes a pattern's `$` as `\Z`).
KNOWN: dict[str, Callable[[str], bool]] = {
    "^/": _absolute,
    "^(/[^\\u0000]*|[^/\\u0000]+)\\Z": _path_or_name,
    "^[A-Za-z0-9_][A-Za-z0-9_.-]*\\$?\\Z": _user_name,
    "^[A-Za-z0-9][A-Za-z0-9_.+-]{0,255}\\Z": _container_id,
}


class Pattern:
    """What validators.py uses of a compiled pattern: search(), truthy on a match."""

    __slots__ = ("source", "_check", "_compiled")

    def __init__(self, source: str) -> None:
        self.source = source
        self._check = KNOWN.get(source)
        self._compiled: object = None

    def search(self, text: str) -> object:
        if self._check is not None:
            return self._check(text) or None
        if self._compiled is None:
            import re  # noqa: PLC0415 - a pattern written out above never needs it

            self._compiled = re.compile(self.source)
        return self._compiled.search(text)  # type: ignore[attr-defined]


def compile(source: str) -> Pattern:  # noqa: A001 - validators.py calls it as re.compile
    return Pattern(source)
