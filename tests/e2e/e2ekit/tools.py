"""Skipping, loudly, when a tool a test drives is missing from this machine."""

import shutil

import pytest


def need_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)} (make deps installs them)")
