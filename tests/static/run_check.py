"""Runs one static check (ruff or mypy) over the tree's sources in this test's runfiles.

Usage (from //tests/static:BUILD): run_check.py ruff|mypy PATH...
The sources reach the runfiles as each package's //<pkg>:py_sources, so Bazel re-runs the check
when any of them changes; the tools are the venv's pinned ruff and mypy.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# The runfiles copy of the workspace: this file is <runfiles>/<workspace>/tests/static/run_check.py.
WORKSPACE = Path(__file__).parent.parent.parent

COMMANDS = {
    "ruff": [sys.executable, "-m", "ruff", "check", "--no-cache", "--config", "ruff.toml"],
    # --no-incremental: a test sandbox has no place for mypy's cache to survive anyway.
    "mypy": [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--no-incremental",
             "--cache-dir", os.devnull],
}


def main(argv: list[str]) -> int:
    tool, *paths = argv[1:]
    os.chdir(WORKSPACE)
    command = COMMANDS[tool] + paths
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv))
