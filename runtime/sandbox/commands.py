"""The OCI lifecycle commands of kata-runtime, with runc's conventions.

create starts a detached shim (runtime/sandbox/shim.py) that owns the VM and
is the container's host process (its pid is the container's pid); the other
commands talk to it over its control socket, or clean up from the saved state
when it is gone. Error messages keep runc's wording where container engines
match on it: "container not running", "does not exist".
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal as signals
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TextIO

from hostos import files
from hostos import process as host_process
from runtime.oci.spec import SpecError, default_spec, find_executable, load_bundle, parse_process
from runtime.sandbox import control, exec_client, hostside
from runtime.sandbox.state import ContainerError, ContainerState, StateStore, Status

# A TCG boot takes seconds; a loaded CI machine several times that.
CREATE_TIMEOUT_S = 300.0
# A shim that answered delete has stopped its VM and is exiting; this bounds the wait for its exit.
SHIM_EXIT_WAIT_S = 30.0
# The states in which a container has a process (created: made, not yet started) to signal.
LIVE = (Status.CREATED, Status.RUNNING, Status.PAUSED)

# Starts the container's shim as a child of this process: (id, bundle, status fd, lock fd,
# console socket) -> its pid. The shim reports on the status fd and holds the lock fd.
ShimStarter = Callable[[str, str, int, int, str], int]

log = logging.getLogger("kata-runtime")


def warn(message: str) -> None:
    """A warning for the --log file when there is one (as runc's: `create`'s stderr is the
    container's, which a runtime warning must not pollute), else for stderr."""
    if any(not isinstance(h, logging.NullHandler) for h in log.handlers):
        log.warning("%s", message)
    else:
        print(f"kata-runtime: warning: {message}", file=sys.stderr)


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


def create(store: StateStore, start_shim: ShimStarter, container_id: str, bundle: str,
           pid_file: str | None, debug: TextIO | None, console_socket: str = "") -> int:
    """Creates the container; its host pid (the shim's) goes to `pid_file`, without a newline
    (containerd parses the whole file as a number)."""
    store.check_id(container_id)
    spec = load_bundle(bundle)  # every bundle error before any VM exists
    for warning in spec.warnings:  # config.json fields the guest ignores, by name
        warn(warning)
    find_executable(spec.rootfs, spec.process)
    console_socket = os.path.abspath(console_socket) if console_socket else ""
    with _locked(store, container_id) as lock_fd:
        reply = _create_locked(store, start_shim, container_id, spec.bundle, lock_fd, console_socket)
    if pid_file:
        try:
            files.write_atomic(pid_file, f"{reply['pid']}".encode())
        except OSError as err:
            delete(store, container_id, force=True)  # nobody could find its process to wait for it
            raise ContainerError(f"cannot write --pid-file {pid_file}: {err}") from err
    if debug:
        state = store.load(container_id)
        print(f"kata-runtime: container {container_id} created: factory path "
              f"{state.annotations.get('io.katacontainers.factory.path')}, phases (ms) "
              f"{state.annotations.get('io.katacontainers.timing.ms')}", file=debug)
        print(f"kata-runtime: container {container_id} create began and ended at (unix s) "
              f"{state.annotations.get('io.katacontainers.timing.unix')}", file=debug)
    return 0


def _create_locked(store: StateStore, start_shim: ShimStarter, container_id: str, bundle: str,
                   lock_fd: int, console_socket: str) -> dict:
    store.reserve(container_id)
    read_fd, write_fd = os.pipe()
    try:
        # The shim gets our stdin, stdout and stderr: they are the container's, as runc's process
        # would have them. It holds the lock with us until create is over, even if this command
        # is killed meanwhile. It is our child: when we exit, it is adopted by the nearest
        # subreaper (a container engine's shim), which waits for it as for runc's process.
        shim = start_shim(container_id, bundle, write_fd, lock_fd, console_socket)
    except BaseException:
        store.remove(container_id)
        raise
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd) as status:
        line = status.readline()
    reply = json.loads(line) if line else {}
    if "error" in reply or not line:
        _, wait_status = os.waitpid(shim, 0)
        _cleanup(store, container_id)
        why = reply.get("error") or (f"the shim exited (status {os.waitstatus_to_exitcode(wait_status)}); "
                                     f"see {store.dir(container_id)}/shim.log")
        raise ContainerError(f"creating container {container_id!r} failed: {why}")
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
    """A signal by number (1..64) or name (KILL, SIGKILL, kill), as runc's kill takes it."""
    if name.isdigit():
        if 1 <= int(name) <= signals.SIGRTMAX:
            return int(name)
        raise ContainerError(f"unknown signal {name!r}: numbers go from 1 to {int(signals.SIGRTMAX)}")
    key = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
    try:
        return int(signals.Signals[key])
    except KeyError:
        raise ContainerError(f"unknown signal {name!r}; use a name such as KILL or TERM, or a number") from None


def kill(store: StateStore, container_id: str, signal_name: str = "SIGTERM", every_process: bool = False) -> int:
    """Signals the container's process (with `every_process`, its execs too; a stopped container
    then is no error, as with runc)."""
    number = parse_signal(signal_name)
    state = current_state(store, container_id)
    if state.status == Status.CREATING:
        raise ContainerError(f"cannot kill container {container_id!r}: it is still being created")
    try:
        if state.status in LIVE:
            control.call(str(store.shim_socket(container_id)),
                         {"op": "kill", "signal": number, "all": every_process})
            return 0
    except ContainerError:
        if current_state(store, container_id).status in LIVE:
            raise
        # It stopped meanwhile: as below.
    if every_process:
        return 0
    raise ContainerError(f"cannot kill container {container_id!r}: container not running")


def delete(store: StateStore, container_id: str, force: bool) -> int:
    """Waits for a create in progress (its lock), then removes the container and its lock file.
    With `force`, a container that does not exist is no error (runc's delete --force, which
    containerd runs again when it cleans up after its shim)."""
    with _locked(store, container_id):
        if force and not store.dir(container_id).exists():
            return 0
        state = current_state(store, container_id)
        if state.status in (Status.RUNNING, Status.PAUSED) and not force:
            raise ContainerError(f"cannot delete container {container_id!r} that is not stopped: "
                                 f"{state.status} (use --force or kill it first)")
        if shim_alive(state):
            try:
                control.call(str(store.shim_socket(container_id)), {"op": "delete"}, timeout_s=60)
                # It has stopped its VM and is on its way out; its exit status is for its reaper.
                host_process.wait_gone(state.shim_pid, state.shim_start_time, SHIM_EXIT_WAIT_S)
            except ContainerError:
                if not force and shim_alive(state):
                    raise
        _cleanup(store, container_id)
    return 0


def _cleanup(store: StateStore, container_id: str) -> None:
    """Whatever is left of a container whose shim is gone or failed: VM, mount, state."""
    # Imported here: only a container whose shim did not clean up needs the factory library, and
    # every other command starts faster without it (containerd runs one per operation).
    import asyncio

    from factory import reaper, sharedfs
    from factory.ownership import OwnerKind
    from factory.vm import stop_recorded

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
    try:
        conn = control.request(str(store.shim_socket(container_id)), {"op": "wait"}, timeout_s=None)
    except ContainerError:
        state = current_state(store, container_id)
        if state.status != Status.STOPPED:
            raise
        return _stopped_exit_status(state)  # the shim exited between the two looks
    with conn:
        conn.read_reply()
        return int(conn.read_reply()["exit_status"])


def _stopped_exit_status(state: ContainerState) -> int:
    if state.exit_status is None:
        raise ContainerError(f"container {state.id!r} stopped without an exit status: {state.reason or 'unknown'}")
    return state.exit_status


def run(store: StateStore, start_shim: ShimStarter, container_id: str, bundle: str, debug: TextIO | None) -> int:
    create(store, start_shim, container_id, bundle, None, debug)
    try:
        start(store, container_id)
        status = wait(store, container_id)
    finally:
        delete(store, container_id, force=True)
    return status


def exec_process(store: StateStore, container_id: str, args: Sequence[str], *, process_file: str | None = None,
                 detach: bool = False, pid_file: str | None = None, console_socket: str = "",
                 tty: bool = False, cwd: str | None = None, env: Sequence[str] = ()) -> int:
    """Runs a process in the container, with this command's stdin, stdout and stderr: `args`
    with the container's process settings, or the OCI process in `process_file` (runc's
    --process). Foreground: returns its exit status. `detach`: returns once it runs, its holder
    (exec_client) in the background with its pid in `pid_file`."""
    state = current_state(store, container_id)
    if state.status != Status.RUNNING:
        why = f" ({state.reason})" if state.reason else ""
        raise ContainerError(f"cannot exec in container {container_id!r}: container not running "
                             f"(it is {state.status}{why})")
    spec = load_bundle(state.bundle)
    raw = _exec_process_spec(spec.process.to_dict(), args, process_file)
    if cwd:
        raw["cwd"] = cwd
    if env:
        raw["env"] = list(raw.get("env") or []) + list(env)
    if tty:
        raw["terminal"] = True
    process = parse_process(raw, process_file or "exec")
    find_executable(spec.rootfs, process)
    request = {"op": "exec", "exec_id": f"exec-{uuid.uuid4().hex[:12]}",
               "console_socket": os.path.abspath(console_socket) if console_socket else "",
               "process": {"args": process.args, "env": process.env, "cwd": process.cwd, "terminal": process.terminal,
                           "user": {"uid": process.uid, "gid": process.gid, "additionalGids": process.additional_gids}}}
    socket_path = str(store.shim_socket(container_id))
    if detach:
        return exec_client.run_detached(socket_path, request, pid_file)
    return exec_client.run_foreground(socket_path, request, pid_file)


def _exec_process_spec(container: dict[str, Any], args: Sequence[str], process_file: str | None) -> dict[str, Any]:
    if process_file:
        if args:
            raise ContainerError(f"exec: give the command in --process {process_file} or as arguments, not both")
        try:
            raw = json.loads(Path(process_file).read_text())
        except OSError as err:
            raise ContainerError(f"cannot read --process {process_file}: {err.strerror}") from err
        except ValueError as err:
            raise ContainerError(f"--process {process_file} is not valid JSON: {err}") from err
        if not isinstance(raw, dict):
            raise ContainerError(f"--process {process_file} must hold an OCI process object")
        return raw
    if not args:
        raise ContainerError("exec needs a command: kata-runtime exec ID -- CMD [ARGS...] or --process FILE")
    return {**container, "args": list(args), "user": {
        "uid": container["uid"], "gid": container["gid"], "additionalGids": container["additional_gids"]}}


def ps(store: StateStore, container_id: str, as_json: bool, ps_args: Sequence[str], out: TextIO) -> int:
    """The container's host processes: its shim (the container's pid) and each exec's holder.
    The table is the host's `ps` output (default `-ef`) cut to those pids, as runc's is."""
    state = current_state(store, container_id)
    pids: list[int] = []
    if state.status in LIVE:
        try:
            pids = [int(p) for p in control.call(str(store.shim_socket(container_id)), {"op": "ps"})["pids"]]
        except ContainerError:
            if current_state(store, container_id).status in LIVE:
                raise
    if as_json:
        print(json.dumps(pids), file=out)
        return 0
    try:
        table = subprocess.run(["ps", *(ps_args or ["-ef"])], capture_output=True, text=True, check=True).stdout
    except FileNotFoundError:
        raise ContainerError("the ps table comes from the host's ps, which is not on PATH: install procps "
                             "(apt install procps), or use --format json") from None
    except (OSError, subprocess.CalledProcessError) as err:
        raise ContainerError(f"ps {' '.join(ps_args or ['-ef'])} failed: {err}") from err
    header, *rows = table.splitlines() or [""]
    try:
        column = header.split().index("PID")
    except ValueError:
        raise ContainerError(f"ps {' '.join(ps_args)} printed no PID column") from None
    print(header, file=out)
    for row in rows:
        fields = row.split()
        if len(fields) > column and fields[column].isdigit() and int(fields[column]) in pids:
            print(row, file=out)
    return 0


def pause_or_resume(store: StateStore, container_id: str, op: str) -> int:
    """`pause` stops the container's VM (its vCPUs) and `resume` continues it."""
    state = current_state(store, container_id)
    if state.status not in LIVE:
        raise ContainerError(f"cannot {op} container {container_id!r}: container not running")
    control.call(str(store.shim_socket(container_id)), {"op": op})
    return 0


def update(store: StateStore, container_id: str, resources: str | None) -> int:
    """Accepted so that engines can call it; the VM's size is fixed at create."""
    state = current_state(store, container_id)
    if state.status not in LIVE:
        raise ContainerError(f"cannot update container {container_id!r}: container not running")
    source = "stdin" if resources in (None, "-") else resources
    try:
        text = sys.stdin.read() if source == "stdin" else Path(source).read_text()
        json.loads(text or "{}")
    except (OSError, ValueError) as err:
        raise ContainerError(f"update: cannot read resources from {source}: {err}") from err
    warn(f"update of container {container_id}: resource updates are not applied to its VM "
         "(its CPUs and memory are fixed when it is created)")
    return 0


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
