"""The OCI lifecycle commands of kata-runtime, with runc's conventions.

create starts a detached shim (runtime/sandbox/shim.py) that owns the VM;
the other commands talk to it over its control socket, or clean up from the
saved state when it is gone.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal as signals
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator, Sequence, TextIO

from factory import reaper, sharedfs
from factory.ownership import OwnerKind
from factory.vm import stop_recorded
from hostos import files
from hostos import process as host_process
from runtime.oci.spec import SpecError, default_spec, find_executable, load_bundle, parse_process
from runtime.sandbox import control, hostside
from runtime.sandbox.state import ContainerError, ContainerState, StateStore, Status

# A TCG boot takes seconds; a loaded CI machine several times that.
CREATE_TIMEOUT_S = 300.0


def shim_alive(state: ContainerState) -> bool:
    return state.shim_pid > 0 and host_process.is_alive(state.shim_pid, state.shim_start_time)


def current_state(store: StateStore, container_id: str) -> ContainerState:
    state = store.load(container_id)
    if state.status != Status.STOPPED and state.status != Status.CREATING and not shim_alive(state):
        state.status = Status.STOPPED  # the shim (and so the container) is gone
        state.reason = state.reason or f"its shim (pid {state.shim_pid}) exited"
    return state


@contextlib.contextmanager
def _locked(store: StateStore, container_id: str) -> Iterator[int]:
    """The container's lock for one command (the fd, to share it with the shim). A container
    that does not exist when the command is done leaves no lock file."""
    store.check_id(container_id)
    fd = store.lock(container_id)
    try:
        yield fd
    finally:
        try:
            if not store.dir(container_id).exists():
                store.remove_lock(container_id)
        finally:
            os.close(fd)


def create(store: StateStore, shim_argv: list[str], container_id: str, bundle: str,
           pid_file: str | None, debug: TextIO | None) -> int:
    store.check_id(container_id)
    spec = load_bundle(bundle)  # every bundle error before any VM exists
    for warning in spec.warnings:  # config.json fields the guest ignores, by name
        print(f"kata-runtime: warning: {warning}", file=sys.stderr)
    find_executable(spec.rootfs, spec.process)
    with _locked(store, container_id) as lock_fd:
        reply = _create_locked(store, shim_argv, container_id, spec.bundle, lock_fd)
    if pid_file:
        try:
            files.write_atomic(pid_file, f"{reply['pid']}\n".encode())
        except OSError as err:
            raise ContainerError(f"cannot write --pid-file {pid_file}: {err}") from err
    if debug:
        state = store.load(container_id)
        print(f"kata-runtime: container {container_id} created: factory path "
              f"{state.annotations.get('io.katacontainers.factory.path')}, phases (ms) "
              f"{state.annotations.get('io.katacontainers.timing.ms')}", file=debug)
    return 0


def _create_locked(store: StateStore, shim_argv: list[str], container_id: str, bundle: str,
                   lock_fd: int) -> dict:
    store.reserve(container_id)
    read_fd, write_fd = os.pipe()
    try:
        # The shim gets our stdout/stderr: the container's output goes there. It holds the lock
        # with us until create is over, even if this command is killed meanwhile.
        shim = subprocess.Popen(shim_argv + ["--status-fd", str(write_fd), "--lock-fd", str(lock_fd),
                                             container_id, bundle],
                                stdin=subprocess.DEVNULL, pass_fds=[write_fd, lock_fd], start_new_session=True,
                                cwd="/")
    except BaseException:
        store.remove(container_id)
        raise
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd) as status:
        line = status.readline()
    if not line:
        shim.wait()
        _cleanup(store, container_id)
        raise ContainerError(f"creating container {container_id!r} failed: the shim exited "
                             f"(status {shim.returncode}); see {store.dir(container_id)}/shim.log")
    reply = json.loads(line)
    if "error" in reply:
        shim.wait()
        _cleanup(store, container_id)
        raise ContainerError(f"creating container {container_id!r} failed: {reply['error']}")
    return reply


def start(store: StateStore, container_id: str) -> int:
    with _locked(store, container_id):
        state = current_state(store, container_id)
        if state.status != Status.CREATED:
            raise ContainerError(f"cannot start container {container_id!r}: it is {state.status}, not created")
        control.call(str(store.shim_socket(container_id)), {"op": "start"})
    return 0


def state_json(store: StateStore, container_id: str, out: TextIO) -> int:
    print(json.dumps(current_state(store, container_id).oci(), indent=2), file=out)
    return 0


def parse_signal(name: str) -> int:
    if name.isdigit():
        return int(name)
    key = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
    try:
        return int(signals.Signals[key])
    except KeyError:
        raise ContainerError(f"unknown signal {name!r}") from None


def kill(store: StateStore, container_id: str, signal_name: str = "SIGTERM") -> int:
    number = parse_signal(signal_name)
    with _locked(store, container_id):
        state = current_state(store, container_id)
        if state.status not in (Status.CREATED, Status.RUNNING):
            raise ContainerError(f"cannot kill container {container_id!r}: it is {state.status}")
        control.call(str(store.shim_socket(container_id)), {"op": "kill", "signal": number})
    return 0


def delete(store: StateStore, container_id: str, force: bool) -> int:
    """Waits for a create in progress (its lock), then removes the container and its lock file."""
    with _locked(store, container_id):
        state = current_state(store, container_id)
        if state.status == Status.RUNNING and not force:
            raise ContainerError(f"cannot delete container {container_id!r}: it is running "
                                 "(use --force or kill it first)")
        if shim_alive(state):
            try:
                control.call(str(store.shim_socket(container_id)), {"op": "delete"}, timeout_s=60)
            except ContainerError:
                if not force:
                    raise
        _cleanup(store, container_id)
    return 0


def _cleanup(store: StateStore, container_id: str) -> None:
    """Whatever is left of a container whose shim is gone or failed: VM, mount, state."""
    try:
        state = store.load(container_id)
    except ContainerError:
        state = None
    if state is not None and shim_alive(state):
        os.kill(state.shim_pid, signals.SIGKILL)
        host_process.wait_gone(state.shim_pid, state.shim_start_time, 5)
    if state is not None:
        sharedfs.unbind(state.share_mount, state.share_mount_id)
        hostside.unbind_all(state.host_mounts)
    if state is not None and state.vm:
        asyncio.run(stop_recorded(state.vm))
    elif state is not None and state.vm_run_root:
        # The shim died while getting its VM, before recording it: the VM's owner record names
        # this container and a dead shim, which is what the reaper looks for.
        reaper.reap(state.vm_run_root, (OwnerKind.CONTAINER,), container_id)
    store.remove(container_id)


def wait(store: StateStore, container_id: str) -> int:
    state = current_state(store, container_id)
    if state.status == Status.STOPPED and not shim_alive(state):
        return _stopped_exit_status(state)
    with control.request(str(store.shim_socket(container_id)), {"op": "wait"}, timeout_s=None) as conn:
        conn.read_reply()
        return int(conn.read_reply()["exit_status"])


def _stopped_exit_status(state: ContainerState) -> int:
    if state.exit_status is None:
        raise ContainerError(f"container {state.id!r} stopped without an exit status: {state.reason or 'unknown'}")
    return state.exit_status


def run(store: StateStore, shim_argv: list[str], container_id: str, bundle: str, debug: TextIO | None) -> int:
    create(store, shim_argv, container_id, bundle, None, debug)
    try:
        start(store, container_id)
        status = wait(store, container_id)
    finally:
        delete(store, container_id, force=True)
    return status


def exec_process(store: StateStore, container_id: str, args: Sequence[str], out: TextIO, err: TextIO) -> int:
    """Runs a process in the container; its output goes straight from the shim to `out` and `err`."""
    state = current_state(store, container_id)
    if state.status != Status.RUNNING:
        why = f" ({state.reason})" if state.reason else ""
        raise ContainerError(f"cannot exec in container {container_id!r}: it is {state.status}{why}, not running")
    if not args:
        raise ContainerError("exec needs a command: kata-runtime exec ID -- CMD [ARGS...]")
    spec = load_bundle(state.bundle)
    process = parse_process({**spec.process.to_dict(), "args": list(args), "user": {
        "uid": spec.process.uid, "gid": spec.process.gid, "additionalGids": spec.process.additional_gids}},
        "exec")
    find_executable(spec.rootfs, process)
    request = {"op": "exec", "exec_id": f"exec-{uuid.uuid4().hex[:12]}",
               "process": {"args": process.args, "env": process.env, "cwd": process.cwd,
                           "user": {"uid": process.uid, "gid": process.gid, "additionalGids": process.additional_gids}}}
    out.flush()
    err.flush()
    with control.request(str(store.shim_socket(container_id)), request, fds=[out.fileno(), err.fileno()],
                         timeout_s=None) as conn:
        conn.read_reply()
        return int(conn.read_reply()["exit_status"])


def list_containers(store: StateStore, out: TextIO, as_json: bool) -> int:
    states = [current_state(store, cid) for cid in store.ids()]
    if as_json:
        print(json.dumps([s.oci() | {"created": s.created} for s in states], indent=2), file=out)
        return 0
    rows = [("ID", "PID", "STATUS", "BUNDLE", "CREATED")] + [
        (s.id, str(s.pid), s.status, s.bundle, s.created) for s in states]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip(), file=out)
    return 0


def write_spec(bundle: str) -> int:
    path = Path(bundle) / "config.json"
    if os.path.lexists(path):
        raise SpecError(f"{path} already exists; remove it first")
    try:
        files.write_atomic(str(path), (json.dumps(default_spec(), indent=2) + "\n").encode(), replace=False)
    except FileExistsError:
        raise SpecError(f"{path} already exists; remove it first") from None
    except OSError as err:
        raise SpecError(f"cannot write {path}: {err}") from err
    return 0
