"""kata-runtime: the VM-isolated container runtime's command line.

Usage: kata-runtime [flags] COMMAND [ARGS...]

Commands:
  version   print the runtime's version
"""
import sys
from typing import Callable, Sequence

from absl import app, flags

from runtime.version import RUNTIME_VERSION

FLAGS = flags.FLAGS


def _version(args: Sequence[str]) -> int:
    print(f"kata-runtime  : {RUNTIME_VERSION}")
    return 0


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "version": _version,
}


def main(argv: Sequence[str]) -> int:
    if len(argv) < 2:
        raise app.UsageError("missing COMMAND; one of: " + ", ".join(sorted(COMMANDS)))
    command, *args = argv[1:]
    if command not in COMMANDS:
        raise app.UsageError(f"unknown command {command!r}; one of: " + ", ".join(sorted(COMMANDS)))
    return COMMANDS[command](args)


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
