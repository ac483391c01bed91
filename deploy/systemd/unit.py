"""Renders kata-vmcache.service for this checkout and installs it.

Usage: bazel run //deploy/systemd:install -- [--config PATH] [--unit_dir DIR] [--dry_run]

ExecStart points at the server binary Bazel built in this checkout
(<workspace>/bazel-bin/vmcache/server); keep the checkout and re-run the
command after moving it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from absl import app, flags

UNIT_NAME = "kata-vmcache.service"
DEFAULT_CONFIG = "/etc/kata-containers/configuration.toml"
DEFAULT_UNIT_DIR = "/etc/systemd/system"

flags.DEFINE_string("config", DEFAULT_CONFIG, "configuration.toml the service runs with")
flags.DEFINE_string("unit_dir", DEFAULT_UNIT_DIR, "where to write the unit")
flags.DEFINE_bool("dry_run", False, "print the unit instead of installing it")
FLAGS = flags.FLAGS


def render(server: str, config: str) -> str:
    """The unit text with absolute paths for the server binary and its configuration."""
    for what, path in (("server", server), ("config", config)):
        if not os.path.isabs(path) or any(c.isspace() for c in path):
            raise ValueError(f"{what} path {path!r} must be absolute and without spaces (systemd would split it)")
    # Beside this file, in the source tree and in Bazel's runfiles (a data dependency).
    template = Path(__file__).with_name("kata-vmcache.service.in").read_text()
    return template.replace("@SERVER@", server).replace("@CONFIG@", config)


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    workspace = os.environ.get("BUILD_WORKSPACE_DIRECTORY")
    if not workspace:
        print("install: run me with `./bazelw run //deploy/systemd:install`", file=sys.stderr)
        return 1
    unit = render(os.path.join(workspace, "bazel-bin", "vmcache", "server"), FLAGS.config)
    if FLAGS.dry_run:
        print(unit, end="")
        return 0
    target = Path(FLAGS.unit_dir, UNIT_NAME)
    try:
        target.write_text(unit)
    except OSError as err:
        print(f"install: cannot write {target}: {err.strerror}; pick another --unit_dir or run as root",
              file=sys.stderr)
        return 1
    print(f"install: wrote {target}")
    if FLAGS.unit_dir == DEFAULT_UNIT_DIR:
        subprocess.run(["systemctl", "daemon-reload"], check=False)
        print(f"install: now `systemctl enable --now {UNIT_NAME}` (needs {FLAGS.config}"
              " with factory.vm_cache_number > 0)")
    return 0


if __name__ == "__main__":
    app.run(main)
