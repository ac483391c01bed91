"""Entry point of the guest agent: `python3 -S -E -s -u -B <dir>/kata_agent.pyc` in the guest.

guest/init runs it and restarts it if it exits; a lost connection is not a reason to exit.
"""

from __future__ import annotations

import signal
import sys
from typing import Dict, List, Optional

from guest.agent import AGENT_VERSION
from guest.agent.guestfs import GuestRoot
from guest.agent.handler import AgentHandler
from guest.agent.log import describe_exception, log
from guest.agent.port import AGENT_PORT_NAME, open_port, wait_for_port
from guest.agent.service import AgentService
from guest.agent.uevent import UeventSocket
from protocols.agent.framing import PROTOCOL_VERSION

USAGE = """usage: kata-agent [--port-name NAME] [--root DIR] [--no-uevents]
  --port-name NAME  virtio-serial port to serve (default agent.0)
  --root DIR        where proc/, sys/ and dev/ are (default /)
  --no-uevents      do not online hot-plugged CPUs and memory as their uevents arrive"""


class UsageError(Exception):
    pass


def parse_args(argv: List[str]) -> Dict[str, object]:
    """Hand-rolled: argparse would add gettext and friends to the guest image for three flags."""
    options: Dict[str, object] = {"port_name": AGENT_PORT_NAME, "root": "/", "uevents": True}
    args = list(argv)
    while args:
        flag = args.pop(0)
        if flag in ("--port-name", "--root"):
            if not args:
                raise UsageError(f"{flag} needs a value\n{USAGE}")
            options[flag[2:].replace("-", "_")] = args.pop(0)
        elif flag == "--no-uevents":
            options["uevents"] = False
        elif flag in ("-h", "--help"):
            raise UsageError(USAGE)
        else:
            raise UsageError(f"unknown argument {flag!r}\n{USAGE}")
    return options


def main(argv: Optional[List[str]] = None) -> int:
    options = parse_args(sys.argv[1:] if argv is None else argv)
    root_dir = str(options["root"])
    root = GuestRoot(root_dir, urandom=GuestRoot(root_dir).dev("urandom"))
    # SIGIO's default action terminates the process: the handler must exist before O_ASYNC.
    signal.signal(signal.SIGIO, lambda signum, frame: None)
    # Children's exits wake the loop through their pidfds; SIGCHLD (through the wakeup fd below)
    # covers a kernel without pidfd_open. Its default disposition would not wake poll().
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    path = wait_for_port(root, str(options["port_name"]))
    port = open_port(path)
    uevents = UeventSocket() if options["uevents"] else None
    handler = AgentHandler(root, warm_up=True)
    service = AgentService(port, handler, uevents=uevents)
    signal.set_wakeup_fd(service.wakeup_fd, warn_on_full_buffer=False)
    service.enqueue(handler.startup_messages())
    log(f"version {AGENT_VERSION} (protocol {PROTOCOL_VERSION}) serving on {path}")
    service.run()
    return 0


def run() -> None:
    """For the launcher: exit non-zero with one readable line on any failure."""
    try:
        sys.exit(main())
    except UsageError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        log(f"fatal: {describe_exception(exc)}")
        sys.exit(1)


if __name__ == "__main__":
    run()
