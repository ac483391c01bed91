"""Paths inside a container rootfs as a process rooted there sees them, seen from outside it.

The agent checks a process's executable before spawning it, from outside the container: symlinks in
the rootfs must then resolve against the rootfs, not the guest's /. busybox images are the
common case: /bin/sh -> /bin/busybox is an absolute link that dangles (or worse, points at the
guest's own busybox) unless followed inside the rootfs.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Dict, List, Sequence

from guest.agent.messages import RequestError

# As Linux's path walk (ELOOP after 40 links).
MAX_SYMLINKS = 40
# execvp's fallback when the environment has no PATH (what runc and Docker give containers too).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def resolve_in_root(root: str, path: str) -> str:
    """The outside path of `path` looked up from inside `root`: symlinks and ".." stay inside.

    Raises OSError (FileNotFoundError, NotADirectoryError, ELOOP) as the lookup inside the container would.
    """
    pending: List[str] = [p for p in path.split("/") if p]
    pending.reverse()  # a stack: the next component is at the end
    resolved: List[str] = []
    links = 0
    while pending:
        part = pending.pop()
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        outside = os.path.join(root, *resolved, part)
        st = os.lstat(outside)
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), os.path.join(root, path.lstrip("/")))
            target = os.readlink(outside)
            if target.startswith("/"):
                resolved = []
            pending.extend(reversed([p for p in target.split("/") if p]))
            continue
        if pending and not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), outside)
        resolved.append(part)
    return os.path.join(root, *resolved)


def env_path(env: Dict[str, str]) -> str:
    return env.get("PATH", DEFAULT_PATH)


def find_executable(root: str, program: str, env: Dict[str, str], cwd: str) -> str:
    """Where execvp(program) inside the container would find the program, as a path inside `root`.

    Raises RequestError naming the program, the rootfs and the PATH searched.
    """
    if not program:
        raise RequestError("args[0] is empty")
    if "/" in program:
        candidates: Sequence[str] = [os.path.normpath(os.path.join(cwd, program))]
        where = ""
    else:
        search = env_path(env)
        # An empty PATH entry means the current directory (POSIX); relative ones are under cwd.
        candidates = [os.path.normpath(os.path.join(cwd, directory or ".", program)) for directory in search.split(":")]
        where = f" (PATH={search})"
    not_executable: List[str] = []
    for candidate in candidates:
        try:
            st = os.stat(resolve_in_root(root, candidate))
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
            return candidate
        not_executable.append(candidate)
    if not_executable:
        raise RequestError(
            f"executable {program!r} in rootfs {root}: {not_executable[0]} is not an executable file{where}"
        )
    raise RequestError(f"executable {program!r} not found in rootfs {root}{where}")
