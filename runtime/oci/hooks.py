"""OCI hooks from config.json, run on the host as runc runs them.

Each hook gets the container's state JSON on stdin (its pid: the shim's host pid, the process
engines address as /proc/<pid>/ns/net) and exactly its own `env`. Stages, when the shim runs them:

  prestart, createRuntime  during create, before the VM is asked for (so files a hook writes, such
                           as nerdctl's /etc/hosts, are shared as written); a failure fails create
  createContainer          right after them: runc runs it inside the container, which here is a
                           VM where the host's hook binaries do not exist, so it runs on the host
                           in the shim's namespaces, as upstream Kata runs it (warned)
  startContainer           skipped (warned): it would have to run inside the container; on the
                           host, after the container exists, it would act on the host instead
  poststart                after start; a failure is a warning
  poststop                 on delete, and on a failed create (as runc's destroy); failures warned

createContainer runs in the shim's network namespace (the container's, on the host side), every
other stage in the network namespace the shim started in, as runc runs hooks in its own.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
from typing import Any, Callable

from runtime.errors import KataRuntimeError

log = logging.getLogger(__name__)

RUN_STAGES = ("prestart", "createRuntime", "createContainer", "poststart", "poststop")
SKIPPED_STAGES = {"startContainer": "it runs inside the container in runc, and the container is a VM that has "
                                    "none of the host's hook binaries"}
WARNED_STAGES = {"createContainer": "it runs on the host in the shim's namespaces, not inside the container "
                                    "(a VM), as upstream Kata runs it"}
# runc waits for a hook without a timeout for ever; here a stuck hook would hold the container's
# lock and its VM, so it gets this long, longer than any engine's own hook takes (milliseconds).
DEFAULT_TIMEOUT_S = 120
# Of a failing hook's output, this much (the end) goes into the error: enough for its message.
OUTPUT_TAIL_BYTES = 4096
# After SIGKILL of a timed-out hook's process group, how long to wait for it to be reaped.
KILL_REAP_S = 5


class HookError(KataRuntimeError):
    """A hook is malformed, failed, or timed out."""


@dataclasses.dataclass(frozen=True)
class Hook:
    path: str
    args: list[str]  # argv, args[0] included; empty: [path]
    env: list[str]
    timeout_s: int | None = None

    def describe(self) -> str:
        return " ".join(self.args or [self.path])


def parse_hooks(raw: Any) -> tuple[dict[str, list[Hook]], list[str]]:
    """(stage -> hooks to run, warnings) from config.json's "hooks"; HookError names a bad entry."""
    if raw in (None, {}):
        return {}, []
    if not isinstance(raw, dict):
        raise HookError(f"hooks must be an object of stage: [hook, ...], got {raw!r}")
    hooks: dict[str, list[Hook]] = {}
    warnings = []
    for stage, entries in raw.items():
        if stage not in RUN_STAGES and stage not in SKIPPED_STAGES:
            raise HookError(f"hooks.{stage} is not an OCI hook stage ({', '.join(RUN_STAGES + tuple(SKIPPED_STAGES))})")
        if not isinstance(entries, list):
            raise HookError(f"hooks.{stage} must be a list of hooks, got {entries!r}")
        parsed = [_parse_hook(entry, f"hooks.{stage}[{i}]") for i, entry in enumerate(entries)]
        if not parsed:
            continue
        names = ", ".join(h.path for h in parsed)
        if stage in SKIPPED_STAGES:
            warnings.append(f"hooks.{stage} ({names}) is skipped ({SKIPPED_STAGES[stage]})")
            continue
        if stage in WARNED_STAGES:
            warnings.append(f"hooks.{stage} ({names}): {WARNED_STAGES[stage]}")
        hooks[stage] = parsed
    return hooks, warnings


def _parse_hook(entry: Any, where: str) -> Hook:
    if not isinstance(entry, dict):
        raise HookError(f"{where} must be an object with a path, got {entry!r}")
    path, args, env, timeout = entry.get("path"), entry.get("args") or [], entry.get("env") or [], entry.get("timeout")
    if not isinstance(path, str) or not os.path.isabs(path):
        raise HookError(f"{where}: path must be an absolute host path, got {path!r}")
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise HookError(f"{where}: args must be a list of strings, got {args!r}")
    if not isinstance(env, list) or not all(isinstance(e, str) and "=" in e for e in env):
        raise HookError(f"{where}: env must be a list of NAME=value strings, got {env!r}")
    if timeout is not None and (not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0):
        raise HookError(f"{where}: timeout must be a positive number of seconds, got {timeout!r}")
    return Hook(path, list(args), list(env), timeout)


def run_hook(hook: Hook, state: dict[str, Any], cwd: str = "/",
             preexec: Callable[[], None] | None = None) -> None:
    """Runs one hook with `state` as JSON on stdin; HookError if it cannot start, exits non-zero or
    outlives its timeout (then its whole process group is killed). `preexec` runs in the child
    before exec (entering the host's network namespace)."""
    timeout = hook.timeout_s or DEFAULT_TIMEOUT_S
    env = dict(e.split("=", 1) for e in hook.env)
    try:
        child = subprocess.Popen(hook.args or [hook.path], executable=hook.path, env=env, cwd=cwd,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 start_new_session=True, preexec_fn=preexec)
    except (OSError, subprocess.SubprocessError) as err:
        raise HookError(f"hook {hook.path}: cannot run it: {err}") from None
    try:
        output, _ = child.communicate(json.dumps(state).encode(), timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(child)
        raise HookError(f"hook {hook.describe()} timed out after {timeout} s (killed)") from None
    except BaseException:
        _kill_group(child)
        raise
    if child.returncode != 0:
        tail = output[-OUTPUT_TAIL_BYTES:].decode(errors="replace").strip()
        status = (f"was killed by signal {-child.returncode}" if child.returncode < 0
                  else f"exited with status {child.returncode}")
        raise HookError(f"hook {hook.describe()} {status}" + (f": {tail}" if tail else ""))


def _kill_group(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        child.communicate(timeout=KILL_REAP_S)
    except subprocess.TimeoutExpired:
        log.error("hook process %d did not end after SIGKILL", child.pid)


def run_stage(hooks: dict[str, list[Hook]], stage: str, state: dict[str, Any], cwd: str = "/",
              preexec: Callable[[], None] | None = None, fatal: bool = True) -> list[str]:
    """Runs a stage's hooks in order. fatal: the first failure raises HookError (the others do not
    run: runc's createRuntime/prestart); else every hook runs and failures come back as warnings."""
    failures = []
    for hook in hooks.get(stage, []):
        try:
            run_hook(hook, state, cwd, preexec)
        except HookError as err:
            if fatal:
                raise HookError(f"{stage} {err}") from None
            failures.append(f"{stage} {err}")
            log.warning("%s %s", stage, err)
    return failures
