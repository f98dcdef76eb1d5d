"""The OCI state a runtime writes on the hook's stdin."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import StateError, loads_strict, quoted
from .regularfile import read_regular
from .schema import validate

# typing costs ~5 ms to import on the container's start path; annotations need it only
# for the type checker, which treats TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAX_STATE_BYTES = 1 << 20
MAX_BUNDLE_CONFIG_BYTES = 16 << 20
# The same rule as the schema's, checked without jsonschema on the poststop path.
CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,255}$")


@dataclass(frozen=True)
class ContainerState:
    oci_version: str
    id: str
    status: str
    pid: int | None
    bundle: str | None
    annotations: Mapping[str, str] = field(default_factory=dict)


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
        validate(doc, "oci-state.schema.json", "OCI state", StateError)
    cid = doc.get("id")
    # fullmatch: with re.match, "$" would also accept an id ending in a newline.
    if not isinstance(cid, str) or not CONTAINER_ID.fullmatch(cid):
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
