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


def baseline_runs(path: Path, record: dict) -> list[dict]:
    """The runs of an earlier record taken as this one's baseline (a large shape's loads may not all fit one
    device call). Refused unless it measured the same model at the same budget on the same GPU: its speed
    would not be this one's. Notes where the baseline came from in `record["baseline_from"]`."""
    import json

    earlier = json.loads(Path(path).read_text())
    where = (earlier.get("model"), earlier.get("budget"), (earlier.get("machine") or {}).get("gpu"))
    here = (record["model"], record["budget"], (record["machine"] or {}).get("gpu"))
    if where != here:
        raise SystemExit(f"{path}: model {where[0]} at {where[1]} on {where[2]}, not {here[0]} at {here[1]} on "
                         f"{here[2]}: pass a baseline run of this shape and budget on this GPU")
    record["baseline_from"] = {"path": Path(path).name, "git_commit": earlier.get("git_commit"), "gpu": where[2]}
    return earlier.get("runs", [])
