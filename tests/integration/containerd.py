"""A private containerd for the integration tests, started with the repo's own configuration file.

The daemon gets the test's --root, --state and --address and the environment the test gives it
(containerd-shim-runc-v2 passes that environment on to the runtime binary: that is how
$KATA_CONF_FILE reaches kata-runtime). `ctr` talks to it with --address and one namespace, and
every container runs with --runc-root and --fifo-dir under the test's directory, so nothing of
the system containerd (/run/containerd, /var/lib/containerd) is used. One thing containerd 1.6
puts outside: each shim's socket, /run/containerd/s/<sha256 of address/namespace/id>; `stop`
checks those of the containers this harness ran and removes any a killed shim left.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from hostos import process
from tests.integration.daemon import LoggedDaemon
from tests.integration.vmtest import clean_up_root, short_tempdir, write_config

CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
SHIM = "/usr/bin/containerd-shim-runc-v2"
# The one configuration file (docs/kubernetes.md shows the same path), in the runfiles.
CONFIG = "deploy/containerd/config.toml"
# What that file names as the kata handler's BinaryName: the default install prefix's launcher.
CONFIG_BINARY = "/usr/local/bin/kata-runtime"
IMAGE_ARCHIVE = "images/busybox-oci.tar"
INSTALL = "tools/install"
# Installing copies the Python tree and the guest assets; uninstalling removes them.
INSTALL_TIMEOUT_S = 300.0
IMAGE = "docker.io/library/kata-busybox:latest"
NAMESPACE = "kvf"
# containerd 1.6 hard-codes its shims' socket directory (runtime/v2/shim/util_unix.go).
SHIM_SOCKET_DIR = "/run/containerd/s"
# The daemon answers in well under a second; a loaded CI machine gets slack.
START_TIMEOUT_S = 30.0
# A ctr command may wait for a VM to boot under TCG, on a loaded 2-core machine.
CTR_TIMEOUT_S = 300.0
# containerd stops in milliseconds when it has no task to wait for.
STOP_TIMEOUT_S = 30.0
# Killing and deleting a leftover task stops its VM: seconds, unless the runtime hangs.
CLEANUP_TIMEOUT_S = 60.0
# The harness check with another runc-compatible binary (e.g. /usr/sbin/runc): see `runtime_binary`.
RUNTIME_OVERRIDE = "KVF_CTR_RUNTIME"


def missing() -> str:
    """Why containerd cannot be used here, or "" when it can (tools/bootstrap.sh installs it)."""
    absent = [path for path in (CONTAINERD, CTR, SHIM) if not os.access(path, os.X_OK)]
    if absent:
        return f"containerd is not installed ({', '.join(absent)} missing): run tools/bootstrap.sh"
    return ""


@contextlib.contextmanager
def installed_prefix() -> Iterator[str]:
    """kata-runtime installed as an operator would (//:install), into a temporary prefix and
    sysconfdir; yields the prefix, uninstalls and checks nothing else was left."""
    root = short_tempdir("kvf-inst-")
    usr = os.path.join(root, "usr")
    args = [INSTALL, "--prefix", usr, "--sysconfdir", os.path.join(root, "etc")]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        assert done.returncode == 0, done.stderr
        yield usr
        removed = subprocess.run(args + ["--uninstall"], capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        assert removed.returncode == 0, removed.stderr
    finally:
        leaks = clean_up_root(root)
        assert not leaks, "the install leaked: " + "; ".join(leaks)


def kata_config(run_root: str, prefix: str, cache: int = 0) -> str:
    """The runtime's configuration: the installed guest assets, every VM and socket under `run_root`.
    Its path is always <run_root>/configuration.toml, which the engine's $KATA_CONF_FILE names."""
    share = os.path.join(prefix, "share", "kata-vmfactory")
    return write_config(run_root, template=False, cache=cache, kernel=f"{share}/vmlinux",
                        initrd=f"{share}/initramfs.cpio.lz4")


def runtime_binary(installed: str) -> str:
    """The runc-compatible binary the tests give ctr: the installed kata-runtime, unless
    $KVF_CTR_RUNTIME names another one (`--test_env=KVF_CTR_RUNTIME=/usr/sbin/runc` checks the
    harness and the containerd side alone)."""
    return os.environ.get(RUNTIME_OVERRIDE) or installed


def render_config(dest: str, prefix: str) -> str:
    """The repo's configuration file with the install prefix substituted in BinaryName; nothing else."""
    text = Path(CONFIG).read_text()
    assert CONFIG_BINARY in text, f"{CONFIG} no longer names {CONFIG_BINARY}"
    Path(dest).write_text(text.replace(CONFIG_BINARY, os.path.join(prefix, "bin", "kata-runtime")))
    return dest


def shim_socket(address: str, namespace: str, container_id: str) -> str:
    """Where containerd 1.6 puts a container's shim socket (runtime/v2/shim.SocketAddress)."""
    digest = hashlib.sha256(os.path.join(address, namespace, container_id).encode()).hexdigest()
    return os.path.join(SHIM_SOCKET_DIR, digest)


def _is_shim(pid: int) -> bool:
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
    except OSError:
        return False  # gone
    return os.path.basename(argv0) == os.path.basename(SHIM).encode()


class Containerd(LoggedDaemon):
    """One private containerd under `root` (which must be short: it holds the gRPC socket)."""

    name = "containerd"

    def __init__(self, root: str, config: str, env: dict[str, str], runtime: str) -> None:
        self.root = root
        self.config = config
        self.address = os.path.join(root, "c.sock")
        self.runc_root = os.path.join(root, "runc")
        self.fifo_dir = os.path.join(root, "fifo")
        self.runtime = runtime
        self.log_path = os.path.join(root, "containerd.log")
        self.env = {**os.environ, **env}
        # The daemon finds containerd-shim-runc-v2 on PATH; Bazel's test PATH may lack /usr/bin.
        self.env["PATH"] = "/usr/local/bin:/usr/bin:/usr/sbin:/bin:/sbin"
        self.ids: set[str] = set()
        super().__init__()

    # ---- the daemon --------------------------------------------------------------------------

    def start(self) -> None:
        os.makedirs(self.root, exist_ok=True)
        self.launch([CONTAINERD, "--config", self.config, "--root", os.path.join(self.root, "lib"),
                     "--state", os.path.join(self.root, "state"), "--address", self.address],
                    self.env, self.address, START_TIMEOUT_S)

    def answers(self) -> bool:
        return os.path.exists(self.address) and self.ctr("version", timeout=10).returncode == 0

    def stop(self) -> list[str]:
        """Deletes what is left, stops the daemon and every shim it started; returns what had leaked.
        The daemon and the shims are stopped even when deleting through ctr fails or hangs."""
        leaks: list[str] = []
        try:
            if self.proc is not None and self.proc.poll() is None:
                leaks += self.leftovers()
                for container_id in self.containers():
                    self.ctr("task", "kill", "--signal", "SIGKILL", container_id, timeout=CLEANUP_TIMEOUT_S)
                    self.ctr("task", "delete", "--force", container_id, timeout=CLEANUP_TIMEOUT_S)
                    self.ctr("container", "delete", container_id, timeout=CLEANUP_TIMEOUT_S)
        except subprocess.TimeoutExpired as err:
            leaks.append(f"cleaning up through ctr hung: {err}")
        finally:
            if self.proc is not None and self.proc.poll() is None:
                process.terminate(self.proc.pid, self.started, STOP_TIMEOUT_S)
                self.proc.wait(STOP_TIMEOUT_S)
            for sock in (self.address, self.address + ".ttrpc"):  # the daemon's own, which it leaves
                if os.path.lexists(sock):
                    os.unlink(sock)
            for pid in self.shim_pids():
                leaks.append(f"containerd-shim pid {pid} outlived containerd")
                started = process.start_time(pid)
                if started is not None:
                    process.terminate(pid, started, STOP_TIMEOUT_S)
            for container_id in sorted(self.ids):
                sock = shim_socket(self.address, NAMESPACE, container_id)
                if os.path.lexists(sock):
                    leaks.append(f"shim socket {sock} of {container_id} left behind")
                    os.unlink(sock)
        return leaks

    # ---- ctr ---------------------------------------------------------------------------------

    def ctr(self, *args: str, timeout: float = CTR_TIMEOUT_S, check: bool = False) -> subprocess.CompletedProcess:
        argv = [CTR, "--address", self.address, "--namespace", NAMESPACE, *args]
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, env=self.env)
        if check:
            assert done.returncode == 0, f"{' '.join(args)}: exit {done.returncode}: {done.stderr}"
        return done

    def import_image(self, archive: str = IMAGE_ARCHIVE) -> str:
        self.ctr("images", "import", archive, check=True)
        return IMAGE

    def run_argv(self, container_id: str, *command: str, detach: bool = False, tty: bool = False) -> list[str]:
        """`ctr run` of the image with the test's runtime binary, runc root and fifo dir: --rm, or -d."""
        self.ids.add(container_id)
        os.makedirs(self.fifo_dir, exist_ok=True)
        return [CTR, "--address", self.address, "--namespace", NAMESPACE, "run",
                "--runc-binary", self.runtime, "--runc-root", self.runc_root, "--fifo-dir", self.fifo_dir,
                "-d" if detach else "--rm", *(["-t"] if tty else []), IMAGE, container_id, *command]

    def run(self, container_id: str, *command: str, detach: bool = False) -> subprocess.CompletedProcess:
        argv = self.run_argv(container_id, *command, detach=detach)
        return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=CTR_TIMEOUT_S, env=self.env)

    def exec_argv(self, container_id: str, exec_id: str, *command: str, tty: bool = False) -> list[str]:
        return [CTR, "--address", self.address, "--namespace", NAMESPACE, "task", "exec", "--exec-id", exec_id,
                "--fifo-dir", self.fifo_dir, *(["-t"] if tty else []), container_id, *command]

    def exec(self, container_id: str, exec_id: str, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.exec_argv(container_id, exec_id, *command), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=CTR_TIMEOUT_S, env=self.env)

    def task_status(self, container_id: str) -> str:
        """RUNNING, STOPPED, ... as `ctr task ls` says; "" when there is no task."""
        for line in self.ctr("task", "ls", check=True).stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == container_id:
                return fields[-1]
        return ""

    def task_pid(self, container_id: str) -> int:
        for line in self.ctr("task", "ls", check=True).stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == container_id:
                return int(fields[1])
        raise AssertionError(f"no task {container_id}")

    def containers(self) -> list[str]:
        return self.ctr("containers", "list", "--quiet", timeout=CLEANUP_TIMEOUT_S).stdout.split()

    # ---- what is left --------------------------------------------------------------------------

    def shim_pids(self) -> list[int]:
        """containerd-shim-runc-v2 processes of this daemon (clients naming its address, such as
        dockerd, are not shims)."""
        return [pid for pid in process.pids_mentioning(self.address) if _is_shim(pid)]

    def leftovers(self) -> list[str]:
        """Containers, tasks, shims, runtime state and shim sockets still there (the daemon itself aside)."""
        left = [f"container {c}" for c in self.containers()]
        tasks = self.ctr("task", "ls", timeout=CLEANUP_TIMEOUT_S).stdout.splitlines()[1:]
        left += [f"task {line.split()[0]}" for line in tasks if line.strip()]
        left += [f"containerd-shim pid {pid}" for pid in self.shim_pids()]
        state = os.path.join(self.runc_root, NAMESPACE)
        if os.path.isdir(state):
            left += [f"runtime state {state}/{name}" for name in sorted(os.listdir(state))]
        left += [f"shim socket of {c}" for c in sorted(self.ids)
                 if os.path.lexists(shim_socket(self.address, NAMESPACE, c))]
        return left

