"""Where the warm server of a state root and a program listens, and the command-line facts the
thin client needs before absl parses anything: which command, which --root."""
from __future__ import annotations

import os
import zlib

# kata-runtime's --root default (runtime/main.py).
DEFAULT_ROOT = "/run/kata-vmfactory"
# The servers' sockets and locks: outside every state root, whose contents engines and tests
# take for containers; a tmpfs, so nothing outlives a reboot. Made 0700 by the first server.
WARM_DIR = "/run/kata-vmfactory-warm"
# Commands that run warm. Not exec (a detached exec's holder is the caller's child and outlives
# it), not factory (init is a long-running server), not the ones that start no container and
# are quick cold anyway (spec, features, check, env, version).
WARM_COMMANDS = frozenset({"create", "run", "start", "state", "kill", "delete", "wait", "ps", "pause",
                           "resume", "list", "update"})
# Flags that take a value (runtime/main.py; tests/unit/test_warm.py checks this list against it),
# by absl name and short name. Any other flag before the command is taken as boolean.
VALUE_FLAGS = frozenset({"config", "root", "log", "log_format", "criu", "rootless", "bundle", "b", "pid_file",
                         "console_socket", "preserve_fds", "process", "p", "cwd", "env", "e", "format",
                         "resources", "r", "status_fd", "lock_fd"})
# Flags that make a command something the warm server must not answer (help, version).
COLD_FLAGS = frozenset({"help", "h", "helpfull", "helpshort", "version", "v", "flagfile"})


def program_dir() -> str:
    """This program's code: the directory holding the runtime package (a runfiles tree or an
    install's lib directory)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def socket_path(root: str, program: str) -> str:
    """One server per state root and program: a server runs the code it was started with, and two
    installs (or two builds) share a root only by accident. (The server checks both in each
    request: the names are short hashes.)"""
    return os.path.join(WARM_DIR, f"{zlib.crc32(program.encode()):08x}-{zlib.crc32(root.encode()):08x}.sock")


def parse(argv: list[str]) -> tuple[str, str] | None:
    """(command, absolute --root) of a command line, or None when this cannot tell (or it asks
    for help or the version). Whether the command runs warm: `command in WARM_COMMANDS`."""
    command = ""
    root = DEFAULT_ROOT
    index = 1
    while index < len(argv):
        arg = argv[index]
        index += 1
        if arg == "--":
            break
        if arg.startswith("-") and arg != "-":
            name, sep, value = arg.lstrip("-").partition("=")
            name = name.replace("-", "_")
            if name in COLD_FLAGS:
                return None
            if name in VALUE_FLAGS and not sep:
                if index >= len(argv):
                    return None
                value = argv[index]
                index += 1
            if name == "root":
                root = value
            continue
        if not command:
            command = arg
        elif command in ("exec", "ps"):
            break  # what follows the ID is a process's or ps's own command line
    if not command:
        return None
    return command, os.path.join(os.environ.get("BUILD_WORKING_DIRECTORY") or os.getcwd(), root)
