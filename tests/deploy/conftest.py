"""Shared fixtures for the deployment checks."""

import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def rtgate_bin():
    """The rtgate binary built from these sources (`$RTGATE_BIN` if set): a stale binary would
    hide a chart or config file value that the current code no longer accepts."""
    if os.environ.get("RTGATE_BIN"):
        return pathlib.Path(os.environ["RTGATE_BIN"])
    subprocess.run(["cargo", "build", "--quiet", "--bin", "rtgate"], cwd=ROOT, check=True)
    return ROOT / "target" / "debug" / "rtgate"
