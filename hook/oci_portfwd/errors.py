"""Errors a user can act on. The CLI prints one as a single line and exits non-zero;
anything else is a bug and goes with its traceback to the log."""

from __future__ import annotations

import _json

# typing costs ~5 ms to import on the container's start path; annotations need it only
# for the type checker, which treats TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

QUOTE_LIMIT = 60


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """repr() of user input for an error line, cut short: the input may be megabytes."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 12]}…({len(text)} chars)"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class _Strict:
    # What json's C scanner reads from its decoder (json.decoder.JSONDecoder's attributes).
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_reject_constant)


# json's own C scanner, without the json package: `import json` brings re and enum along
# (~5 ms of every container start and stop, issue 12). The result is json.loads's.
_scan = _json.make_scanner(_Strict())  # type: ignore[arg-type]
_JSON_SPACE = " \t\n\r"


def loads_strict(raw: bytes | str) -> Any:
    """json.loads that refuses NaN and Infinity: Python accepts them, JSON does not, and
    a NaN passes every numeric bound of a schema (all its comparisons are false)."""
    try:
        text = raw.decode() if isinstance(raw, bytes) else raw
        text = text.strip(_JSON_SPACE)
        doc, end = _scan(text, 0)
        if end == len(text):
            return doc
    except RecursionError:
        raise
    except Exception:  # noqa: BLE001, S110 - json.loads below says what is wrong, as it always did
        pass
    import json  # noqa: PLC0415 - other encodings and malformed input: json's own messages

    return json.loads(raw, parse_constant=_reject_constant)


class PortfwdError(Exception):
    """Base of every user-facing error: str(error) is the whole message."""


class StateError(PortfwdError):
    """The OCI state on stdin is unusable."""


class ConfigError(PortfwdError):
    """The global config or a per-container override is invalid."""


class PortSpecError(PortfwdError):
    """A port request in the annotation cannot be parsed."""


class BindError(PortfwdError):
    """A host port could not be bound."""


class DriverError(PortfwdError):
    """The selected driver is unknown or cannot serve the plan."""


class NamespaceError(PortfwdError):
    """The container's namespaces could not be joined."""


class ContainerGone(NamespaceError):
    """The container's process exited before its namespaces were joined (a delete right after
    the start): nothing failed."""


class StartError(PortfwdError):
    """The forwarding did not come up."""


class StateDirError(PortfwdError):
    """The state directory is missing, unsafe or not ours."""
