"""A private dockerd for the integration tests, on the test's private containerd.

dockerd is Debian's (docker.io 20.10), extracted by tools/bootstrap.sh into its cache, never
installed: no system service, no /var/lib/docker, no /etc/docker. Each daemon gets the test's
--data-root, --exec-root, --pidfile and socket, a daemon.json of its own (dockerd's trust key
would otherwise go to /etc/docker/key.json), `--containerd` the test's containerd (so Docker's
containers reach kata-runtime through containerd-shim-runc-v2, as on a node), and
`--add-runtime kata=<installed kata-runtime>`.

It runs in a network namespace of its own (`unshare --net`): its default bridge (docker0), the
veth pairs and the addresses it hands out exist only there, so `docker run` on the default
network goes through libnetwork's prestart hook exactly as on a Docker host, and this machine's
network is untouched (no iptables rules either: --iptables=false). The hook moves the container's
veth into the namespace of the pid in the OCI state, the shim's.

What dockerd leaves when it stops, and `stop` removes: the nsfs bind mount of its namespace
(<exec-root>/netns/default) and /run/docker/plugins, which dockerd 20.10 creates at a fixed path.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from hostos import mounts, process
from tests.integration.containerd import CTR, Containerd, shim_socket
from tests.integration.daemon import LoggedDaemon
from tests.integration.vmtest import mounts_under

# Where tools/bootstrap.sh extracts Debian's docker.io package (dpkg-deb -x, not installed).
DOCKER_CACHE = os.path.join(os.environ.get("KATA_VMFACTORY_STATE", "/var/cache/kata-vmfactory"), "docker", "root")
# The extracted daemon first; a system-wide one works as well.
DOCKERD_CANDIDATES = (f"{DOCKER_CACHE}/usr/sbin/dockerd", "/usr/sbin/dockerd", "/usr/bin/dockerd")
# The CLI users here type (28.x negotiates the daemon's API 1.41 down), else the package's own.
CLI_CANDIDATES = ("/usr/local/bin/docker", "/usr/bin/docker", f"{DOCKER_CACHE}/usr/bin/docker")
UNSHARE = "/usr/bin/unshare"
IMAGE = "kata-busybox:latest"
RUNTIME = "kata"
# The containerd namespace dockerd puts its containers in.
NAMESPACE = "moby"
# dockerd 20.10 creates this whatever --exec-root says (the v1 plugin discovery directory).
PLUGINS_DIR = "/run/docker/plugins"
# dockerd answers within a second or two; a loaded CI machine gets slack.
START_TIMEOUT_S = 60.0
# A docker command may wait for a VM to boot under TCG, on a loaded 2-core machine.
DOCKER_TIMEOUT_S = 300.0
# dockerd stops its (already removed) containers and itself in seconds.
STOP_TIMEOUT_S = 60.0


def find(candidates: tuple[str, ...]) -> str:
    return next((path for path in candidates if os.access(path, os.X_OK)), "")


def missing() -> str:
    """Why Docker cannot be used here, or "" when it can."""
    if not find(DOCKERD_CANDIDATES):
        return (f"no dockerd ({', '.join(DOCKERD_CANDIDATES)}): run tools/bootstrap.sh, which extracts "
                "Debian's docker.io into its cache")
    if not find(CLI_CANDIDATES):
        return f"no docker CLI ({', '.join(CLI_CANDIDATES)})"
    if not os.access(UNSHARE, os.X_OK):
        return f"{UNSHARE} is missing (util-linux): dockerd runs in a network namespace of its own"
    return ""


class Dockerd(LoggedDaemon):
    """One private dockerd under `root` (short: it holds sockets), on `containerd`."""

    name = "dockerd"

    def __init__(self, root: str, containerd: Containerd, runtime: str, env: dict[str, str]) -> None:
        self.root = root
        self.containerd = containerd
        self.runtime = runtime
        self.data_root = os.path.join(root, "data")
        self.exec_root = os.path.join(root, "exec")
        self.socket = os.path.join(root, "d.sock")
        self.log_path = os.path.join(root, "dockerd.log")
        self.dockerd = find(DOCKERD_CANDIDATES)
        self.cli = find(CLI_CANDIDATES)
        self.env = {**containerd.env, **env}
        # The CLI keeps its config (and would create ~/.docker) here instead.
        self.cli_env = {**self.env, "DOCKER_HOST": "unix://" + self.socket, "DOCKER_CONFIG": os.path.join(root, "cli")}
        self.cidfiles: list[str] = []  # one per docker run: the ids of containers --rm removed too
        super().__init__()
        self.made_plugins_dir = False

    # ---- the daemon --------------------------------------------------------------------------

    def start(self) -> None:
        os.makedirs(self.root, exist_ok=True)
        config = os.path.join(self.root, "daemon.json")
        Path(config).write_text(json.dumps({"deprecated-key-path": os.path.join(self.root, "key.json")}))
        self.made_plugins_dir = not os.path.exists(PLUGINS_DIR)
        argv = [UNSHARE, "--net", self.dockerd, "--config-file", config,
                "--data-root", self.data_root, "--exec-root", self.exec_root,
                "--pidfile", os.path.join(self.root, "dockerd.pid"), "--host", "unix://" + self.socket,
                "--containerd", self.containerd.address,
                "--iptables=false", "--ip-forward=false", "--ip-masq=false", "--userland-proxy=false",
                "--storage-driver", "overlay2", "--add-runtime", f"{RUNTIME}={self.runtime}"]
        self.launch(argv, self.env, self.socket, START_TIMEOUT_S)  # unshare execs dockerd: its pid is the daemon's

    def answers(self) -> bool:
        return os.path.exists(self.socket) and self.docker("version", timeout=30).returncode == 0

    def stop(self) -> list[str]:
        """Removes what is left, stops the daemon, undoes what it leaves; returns what had leaked."""
        leaks: list[str] = []
        try:
            if self.proc is not None and self.proc.poll() is None:
                leaks += self.leftovers()
                left = self.containers()
                if left:
                    self.docker("rm", "--force", *left)
        except subprocess.TimeoutExpired as err:
            leaks.append(f"cleaning up through docker hung: {err}")
        finally:
            if self.proc is not None and self.proc.poll() is None:
                process.terminate(self.proc.pid, self.started, STOP_TIMEOUT_S)
                self.proc.wait(STOP_TIMEOUT_S)
            expected = {os.path.join(self.exec_root, "netns", "default"), self.data_root}
            for point in sorted(mounts_under(self.root), key=len, reverse=True):
                if point not in expected:
                    leaks.append(f"mount {point} left by dockerd")
                try:
                    mounts.unmount_lazy(point)
                except OSError as err:  # gone with a mount above it
                    leaks.append(str(err))
            if self.made_plugins_dir:
                for directory in (PLUGINS_DIR, os.path.dirname(PLUGINS_DIR)):
                    try:
                        os.rmdir(directory)
                    except OSError:
                        pass  # not empty: someone else's now
            for container_id in self.ids:
                sock = shim_socket(self.containerd.address, NAMESPACE, container_id)
                if os.path.lexists(sock):
                    leaks.append(f"shim socket {sock} of {container_id[:12]} left behind")
                    os.unlink(sock)
        return leaks

    # ---- the CLI -----------------------------------------------------------------------------

    def docker(self, *args: str, timeout: float = DOCKER_TIMEOUT_S, check: bool = False) -> subprocess.CompletedProcess:
        done = subprocess.run([self.cli, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, env=self.cli_env)
        if check:
            assert done.returncode == 0, f"docker {' '.join(args)}: exit {done.returncode}: {done.stderr}"
        return done

    def load_image(self, archive: str) -> str:
        self.docker("load", "--input", archive, check=True)
        return IMAGE

    def run_argv(self, *args: str) -> list[str]:
        """`docker run --runtime kata` with `args` (options, the image, the command)."""
        cidfile = os.path.join(self.root, f"cid-{len(self.cidfiles)}")
        self.cidfiles.append(cidfile)
        return [self.cli, "run", "--runtime", RUNTIME, "--cidfile", cidfile, *args]

    @property
    def ids(self) -> list[str]:
        """Every container `docker run` made here."""
        return sorted(Path(f).read_text().strip() for f in self.cidfiles if os.path.exists(f))

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.run_argv(*args), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=DOCKER_TIMEOUT_S, env=self.cli_env)

    def run_detached(self, *args: str) -> str:
        done = self.run("--detach", *args)
        assert done.returncode == 0, done.stderr + self.log()
        return done.stdout.strip()

    def inspect(self, container_id: str, template: str) -> str:
        return self.docker("inspect", "--format", template, container_id, check=True).stdout.strip()

    def containers(self) -> list[str]:
        return self.docker("ps", "--all", "--quiet", "--no-trunc", timeout=STOP_TIMEOUT_S).stdout.split()

    # ---- what is left --------------------------------------------------------------------------

    def runtime_states(self) -> list[str]:
        """kata-runtime's state directories under dockerd's runc roots (<exec-root>/runtime-*/moby)."""
        found = []
        for root in Path(self.exec_root).glob(f"runtime-*/{NAMESPACE}"):
            found += [str(entry) for entry in root.iterdir()]
        return found

    def leftovers(self) -> list[str]:
        """Containers in dockerd and containerd, runtime state and shim sockets still there."""
        left = [f"docker container {c[:12]}" for c in self.containers()]
        listed = subprocess.run([CTR, "--address", self.containerd.address, "--namespace", NAMESPACE,
                                 "containers", "list", "--quiet"], capture_output=True, text=True,
                                timeout=STOP_TIMEOUT_S, env=self.env).stdout.split()
        left += [f"containerd container {c[:12]}" for c in listed]
        left += [f"runtime state {path}" for path in self.runtime_states()]
        left += [f"shim socket of {c[:12]}" for c in self.ids
                 if os.path.lexists(shim_socket(self.containerd.address, NAMESPACE, c))]
        return left
