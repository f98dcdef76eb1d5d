"""What a process hands to the program it execs: values (values.Value, nested) and plain
data, as JSON in a memfd that the exec inherits.

The supervisor forks each core and execs a fresh interpreter for it (core_process.py): a
fork would carry everything the hook and the supervisor imported into every container's
memory for its whole life (issue 12). And it hands itself over to portfwd-keeper, which
execs it again on supervisor.resume(). pickle would do, but brings collections and
functools into the core; these values are a few fields each.
"""

from __future__ import annotations

import os

from .errors import loads_strict
from .jsontext import to_json
from .values import Value

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

KIND = "~"  # the key naming a Value's class


def write(payload: dict[str, object]) -> int:
    """A memfd holding `payload`, at offset 0, inheritable (the exec's only copy)."""
    fd = os.memfd_create("portfwd-handover", 0)
    data = to_json(_encode(payload)).encode()
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def read(fd: int, kinds: tuple[type[Value], ...]) -> dict[str, Any]:
    """What write() put in the memfd `fd` (closed here); JSON arrays come back as tuples and
    each Value as its class among `kinds`."""
    with open(fd, "rb") as f:
        doc = loads_strict(f.read())
    by_name = {kind.__name__: kind for kind in kinds}
    payload = _decode(doc, by_name)
    assert isinstance(payload, dict)
    return payload


def _encode(value: object) -> object:
    if isinstance(value, Value):
        fields = {name: _encode(getattr(value, name)) for name in value.__slots__}
        return {KIND: type(value).__name__, **fields}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    return value


def _decode(doc: object, kinds: dict[str, type[Value]]) -> object:
    if isinstance(doc, list):
        return tuple(_decode(v, kinds) for v in doc)
    if isinstance(doc, dict):
        fields = {k: _decode(v, kinds) for k, v in doc.items() if k != KIND}
        if KIND in doc:
            return kinds[doc[KIND]](**fields)
        return fields
    return doc
