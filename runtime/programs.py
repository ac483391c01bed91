"""Where kata-runtime finds the VMCache server program, which it runs but never imports.

The two programs are peers above the factory library: `factory init` with VMCache on execs the
server instead of importing it, so neither program depends on the other's code.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from runtime.errors import KataRuntimeError

# Set by an install, or by a user running a server built elsewhere.
SERVER_ENV = "KATA_VMCACHE_SERVER"
# The name an install puts on PATH.
INSTALLED_SERVER = "kata-vmcache-server"
# Under `bazel run`, the server binary is a data dependency beside this package in the runfiles.
_RUNFILES_SERVER = Path(__file__).parent.parent / "vmcache" / "server"


def vmcache_server() -> str:
    """The server program's path; raises KataRuntimeError naming where it looked."""
    explicit = os.environ.get(SERVER_ENV)
    candidates = [explicit] if explicit else [str(_RUNFILES_SERVER), shutil.which(INSTALLED_SERVER)]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    looked = explicit if explicit else f"{_RUNFILES_SERVER} and {INSTALLED_SERVER} on PATH"
    raise KataRuntimeError(f"cannot find the VMCache server program (looked at {looked}); "
                              f"set ${SERVER_ENV} to its path")
