"""The runtime's --log file, in runc's two formats, which container engines read back.

containerd's runc shim runs every command with `--log <bundle>/log.json --log-format json` and,
when a command fails, reports the `msg` of the last `"level":"error"` line in that file (its
`time` must parse as RFC 3339, or containerd reports that it could not read the error). The text
format is logrus's, as runc writes it without --log-format.
"""
from __future__ import annotations

import json
import logging
import time
from typing import TextIO

FORMATS = ("text", "json")


def timestamp(now: float | None = None) -> str:
    """RFC 3339 in UTC, to the second, as runc's log lines carry it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if now is None else now))


def format_line(level: str, msg: str, log_format: str, now: float | None = None) -> str:
    if log_format == "json":
        return json.dumps({"level": level, "msg": msg, "time": timestamp(now)}, separators=(",", ":"))
    return f"time={json.dumps(timestamp(now))} level={level} msg={json.dumps(msg)}"


class RuntimeLogHandler(logging.Handler):
    """Python log records as runc log lines, one per record, appended to `stream`."""

    LEVELS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
              logging.ERROR: "error", logging.CRITICAL: "fatal"}

    def __init__(self, stream: TextIO, log_format: str) -> None:
        super().__init__()
        if log_format not in FORMATS:
            raise ValueError(f"log format {log_format!r}")
        self.stream = stream
        self.log_format = log_format

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = self.LEVELS.get(record.levelno, "info")
            self.stream.write(format_line(level, record.getMessage(), self.log_format, record.created) + "\n")
            self.stream.flush()
        except Exception:  # a log that cannot be written must not turn into the command's failure
            self.handleError(record)


def last_error(path: str) -> str:
    """The msg of the last error line of a json log, as containerd reads it (for tests and tools)."""
    message = ""
    with open(path) as f:
        for line in f:
            if line.strip():
                entry = json.loads(line)
                if entry.get("level") == "error":
                    message = str(entry.get("msg", "")).strip()
    return message
