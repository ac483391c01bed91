"""A host pty driving one command (ctr run -t, docker run -it), as a user at a terminal would."""
from __future__ import annotations

import errno
import fcntl
import os
import pty
import select
import struct
import subprocess
import termios
import time

# Odd sizes, so the container cannot print them by chance.
DEFAULT_SIZE = (33, 101)
# A command's first output may wait for a VM to boot under TCG, on a loaded 2-core machine.
START_TIMEOUT_S = 300.0
# Once the command is done, its terminal closes in seconds.
TASK_TIMEOUT_S = 60.0


class Terminal:
    """A host pty driving one command, as a user at a terminal would."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        self.resize(DEFAULT_SIZE, slave)
        try:
            self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                         start_new_session=True)
        finally:
            os.close(slave)
        self.seen = b""

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def resize(self, size: tuple[int, int], fd: int | None = None) -> None:
        fcntl.ioctl(self.master if fd is None else fd, termios.TIOCSWINSZ, struct.pack("HHHH", *size, 0, 0))

    def answer(self, command: str, mark: int) -> str:
        """What the shell prints for `command`: up to an end mark only the shell can print
        (the typed line echoes as end-$((mark+0)))."""
        start = len(self.seen)
        self.type(f"{command}; echo end-$(({mark}+0))\n")
        self.expect(f"end-{mark}\r")
        return self.seen[start:].decode(errors="replace")

    def expect(self, what: str, timeout_s: float = START_TIMEOUT_S) -> None:
        """Reads until `what` has appeared; AssertionError (with the screen) after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while what.encode() not in self.seen:
            assert self._read(deadline), f"the terminal closed before {what!r}: {self.seen[-2000:]!r}"

    def wait_exit(self, timeout_s: float = TASK_TIMEOUT_S) -> int:
        """Reads until every slave side is closed; the command's exit code."""
        deadline = time.monotonic() + timeout_s
        while self._read(deadline):
            pass
        return self.proc.wait(timeout_s)

    def _read(self, deadline: float) -> bool:
        """One read into `seen`; False once the terminal is closed."""
        left = deadline - time.monotonic()
        assert left > 0, f"gave up waiting on the terminal; it showed {self.seen[-2000:]!r}"
        ready, _, _ = select.select([self.master], [], [], left)
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 4096)
        except OSError as err:
            if err.errno != errno.EIO:  # EIO: every slave side is closed
                raise
            return False
        self.seen += chunk
        return bool(chunk)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
