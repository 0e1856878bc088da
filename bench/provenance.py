"""What every benchmark record says about where it came from: the command, the commit, the time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command() -> str:
    """This script's command line, relative to the repository root."""
    return " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])


def git_commit() -> str | None:
    """$OVERSPILL_GIT_COMMIT (the GPU machine gets the tree without .git), else this checkout's HEAD."""
    if os.environ.get("OVERSPILL_GIT_COMMIT"):
        return os.environ["OVERSPILL_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip() or None
    except OSError:
        return None


def header(benchmark: str, stamp: str, machine: dict | None) -> dict:
    """The first keys of a benchmark's JSON record."""
    return {"benchmark": benchmark, "command": command(), "git_commit": git_commit(), "time": stamp, "machine": machine}
