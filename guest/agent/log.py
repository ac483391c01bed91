"""Minimal logging to stderr (the guest's serial console).

Not the logging module: it pulls threading, traceback, string and re into the initramfs and
costs import time under TCG, for one line per event.
"""

from __future__ import annotations

import sys
import time


def log(message: str) -> None:
    uptime = time.clock_gettime(time.CLOCK_BOOTTIME)
    sys.stderr.write(f"[{uptime:10.3f}] kata-agent: {message}\n")
    sys.stderr.flush()


def describe_exception(exc: BaseException) -> str:
    """`Type: message (at file:line <- file:line ...)` without importing traceback."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}")
        tb = tb.tb_next
    where = " <- ".join(reversed(frames[-4:]))
    return f"{type(exc).__name__}: {exc}" + (f" (at {where})" if where else "")
