"""JSON Schema validation against the files under schemas/.

jsonschema costs ~65 ms to import, so it is imported here, only when a document is
validated: poststop and --version never pay for it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from .errors import PortfwdError


def schema_dirs() -> list[Path]:
    """Where the schemas may live: source tree, venv/prefix, system package."""
    dirs = []
    if env := os.environ.get("OCI_PORTFWD_SCHEMA_DIR"):
        dirs.append(Path(env))
    dirs += [
        Path(__file__).resolve().parents[2] / "schemas",
        Path(sys.prefix) / "share" / "oci-portfwd-hook" / "schemas",
        Path("/usr/share/oci-portfwd-hook/schemas"),
    ]
    return dirs


def load_schema(name: str) -> dict[str, Any]:
    for directory in schema_dirs():
        path = directory / name
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                schema: dict[str, Any] = json.load(f)
                return schema
    searched = ", ".join(str(d) for d in schema_dirs())
    raise PortfwdError(f"schema {name} not found (searched {searched}); reinstall the package")


def validate(instance: Any, schema_name: str, what: str, error: type[PortfwdError]) -> None:
    """Raise `error` naming the first offending place, e.g. `config /driver: 'x' is not one of …`."""
    import jsonschema  # noqa: PLC0415 - deliberately lazy, see module doc

    schema = load_schema(schema_name)
    validator_cls = jsonschema.validators.validator_for(schema)
    problem = jsonschema.exceptions.best_match(validator_cls(schema).iter_errors(instance))
    if problem is None:
        return
    where = "/" + "/".join(str(p) for p in problem.absolute_path) if problem.absolute_path else ""
    raise error(f"{what}{' ' + where if where else ''}: {_short(problem.message)}")


def _short(message: str, limit: int = 200) -> str:
    # Messages quote the offending value; a huge value must not flood the one-line error.
    return message if len(message) <= limit else message[: limit - 1] + "…"
