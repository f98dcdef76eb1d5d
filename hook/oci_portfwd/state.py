"""The OCI state a runtime writes on the hook's stdin."""

from __future__ import annotations

import os

from .errors import StateError, loads_strict, quoted
from .regularfile import read_regular

# typing costs ~5 ms to import on the container's start path; annotations need it only
# for the type checker, which treats TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

MAX_STATE_BYTES = 1 << 20
MAX_BUNDLE_CONFIG_BYTES = 16 << 20
# The schema's rule for an id, ^[A-Za-z0-9][A-Za-z0-9_.+-]{0,255}$, checked without
# jsonschema, and without re (which costs the stop path ~3 ms with enum, issue 12).
_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_ID_CHARS = _ALNUM | frozenset("_.+-")


def is_container_id(value: object) -> bool:
    return (
        isinstance(value, str)
        and 1 <= len(value) <= 256
        and value[0] in _ALNUM
        and all(c in _ID_CHARS for c in value)
    )


class ContainerState:
    """A plain class, not a dataclass: the start and stop paths run on every container
    start, and dataclasses brings inspect, ast and dis along (~6 ms, issue 12)."""

    __slots__ = ("oci_version", "id", "status", "pid", "bundle", "annotations")

    def __init__(
        self,
        oci_version: str,
        id: str,  # noqa: A002 - the OCI state's name for it
        status: str,
        pid: int | None,
        bundle: str | None,
        annotations: Mapping[str, str] | None = None,
    ) -> None:
        self.oci_version = oci_version
        self.id = id
        self.status = status
        self.pid = pid
        self.bundle = bundle
        self.annotations: Mapping[str, str] = {} if annotations is None else annotations

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ContainerState):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    __hash__ = None  # type: ignore[assignment]  # like the dataclass's: annotations is a dict

    def __repr__(self) -> str:
        return "ContainerState(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"


def decode_state(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_STATE_BYTES:
        raise StateError(f"state on stdin is larger than {MAX_STATE_BYTES} bytes")
    if not raw.strip():
        raise StateError("no OCI state on stdin (is the hook run by an OCI runtime?)")
    try:
        doc = loads_strict(raw)
    except RecursionError:
        raise StateError("state on stdin is nested too deeply to be an OCI state") from None
    except ValueError as e:
        raise StateError(f"state on stdin is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise StateError(f"state on stdin must be a JSON object, not {type(doc).__name__}")
    return doc


def parse_state(raw: bytes, *, full_validation: bool) -> ContainerState:
    """Full validation (jsonschema) at prestart; at poststop only what is needed to find
    the container's forwarding, so that a runtime's odd poststop state never blocks cleanup."""
    doc = decode_state(raw)
    if full_validation:
        from .schema import validate  # noqa: PLC0415 - prestart only

        validate(doc, "oci-state.schema.json", "OCI state", StateError)
    cid = doc.get("id")
    if not isinstance(cid, str) or not is_container_id(cid):
        raise StateError(f"OCI state has no usable container id (got {quoted(cid)})")
    pid = doc.get("pid")
    annotations = doc.get("annotations") or {}
    return ContainerState(
        oci_version=str(doc.get("ociVersion", "")),
        id=cid,
        status=str(doc.get("status", "")),
        pid=pid if isinstance(pid, int) and pid > 0 else None,
        bundle=doc.get("bundle") if isinstance(doc.get("bundle"), str) else None,
        annotations=annotations if isinstance(annotations, dict) else {},
    )


def bundle_config(bundle: str | None, what: str) -> dict[str, Any] | None:
    """bundle/config.json (the OCI spec of the container), None when there is none."""
    if not bundle:
        return None
    path = os.path.join(bundle, "config.json")
    try:
        doc = loads_strict(read_regular(path, MAX_BUNDLE_CONFIG_BYTES))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateError(f"cannot read {what} from {path}: {e.strerror}") from None
    except (ValueError, RecursionError) as e:
        raise StateError(f"cannot read {what} from {path}: not valid JSON ({e})") from None
    return doc if isinstance(doc, dict) else None


def bundle_annotations(bundle: str | None) -> dict[str, str]:
    """The annotations of bundle/config.json: some callers leave them out of the state."""
    doc = bundle_config(bundle, "annotations")
    annotations = doc.get("annotations") if doc is not None else None
    if not isinstance(annotations, dict):
        return {}
    return {k: v for k, v in annotations.items() if isinstance(k, str) and isinstance(v, str)}


def bundle_namespaces(bundle: str | None) -> list[Any] | None:
    """linux.namespaces of bundle/config.json; None when there is no such list."""
    doc = bundle_config(bundle, "the namespaces")
    linux = doc.get("linux") if doc is not None else None
    namespaces = linux.get("namespaces") if isinstance(linux, dict) else None
    return namespaces if isinstance(namespaces, list) else None
