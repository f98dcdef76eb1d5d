"""Measurements the reliability tests report (recovery times, descriptor counts, memory).

Printed as one `MEASURE name key=value…` line (seen with `pytest -s`, and in a failing test's
captured output); also appended as a JSON line to the file named by E2E_MEASUREMENTS, if set.
"""

import json
import os
import sys


def note(name: str, **values) -> None:
    text = " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    print(f"MEASURE {name} {text}", file=sys.stderr, flush=True)
    path = os.environ.get("E2E_MEASUREMENTS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"name": name, **values}, default=str) + "\n")
