"""A daemon an integration test starts (containerd, dockerd): its output in a log file, and
started only once it answers, or failed with the end of that log."""
from __future__ import annotations

import subprocess
from pathlib import Path

from hostos import process
from tests.integration.vmtest import wait_for

# How much of a daemon's log an assertion shows: the end, where its failure is.
LOG_TAIL_CHARS = 4000


class LoggedDaemon:
    """Subclasses name themselves, say where they answer and how to ask (`answers`)."""

    name = "daemon"
    log_path: str

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.started = 0  # the daemon's start time: stopping it never signals a recycled pid

    def answers(self) -> bool:
        raise NotImplementedError

    def launch(self, argv: list[str], env: dict[str, str], where: str, timeout_s: float) -> None:
        """Starts `argv` in a session of its own and waits until it answers or exits."""
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        self.started = process.start_time(self.proc.pid) or 0
        wait_for(f"{self.name} to answer on {where}", self._answers_or_exited, timeout_s)
        assert self.proc.poll() is None, f"{self.name} exited {self.proc.returncode}: {self.log()}"

    def _answers_or_exited(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            return True  # launch() reports the exit with the log
        return self.answers()

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text()[-LOG_TAIL_CHARS:]
        except OSError:
            return ""
