"""JSON text for the hook's records and messages (state file, handover, the dialer's
reports), without the json package: it brings re and enum (~5 ms on the start path, and
memory of every core; issue 12). Reading is errors.loads_strict's (_json's scanner)."""

from __future__ import annotations

import _json


def to_json(value: object) -> str:
    """json.dumps for a record's values: str, int, float, None, bool, lists, dicts."""
    if isinstance(value, str):
        return str(_json.encode_basestring_ascii(value))
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{value!r} is not JSON")
        return float.__repr__(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(to_json(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{\n" + ",\n".join(f" {to_json(str(k))}: {to_json(v)}" for k, v in value.items()) + "\n}"
    raise TypeError(f"{type(value).__name__} is not JSON")
