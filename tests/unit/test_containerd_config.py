"""deploy/containerd/config.toml is the one containerd configuration: a kata CRI handler on the runc
shim running the installed launcher, and docs/kubernetes.md points at it instead of copying it."""
import re
import tomllib
from pathlib import Path

CONFIG = Path("deploy/containerd/config.toml")
GUIDE = Path("docs/kubernetes.md")
# `bazel run //:install` puts the launcher here with its default --prefix (/usr/local).
INSTALLED_LAUNCHER = "/usr/local/bin/kata-runtime"


def test_the_kata_handler_runs_the_installed_launcher_through_containerds_runc_shim():
    config = tomllib.loads(CONFIG.read_text())
    assert config["version"] == 2
    cri = config["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    kata = cri["runtimes"]["kata"]
    assert kata["runtime_type"] == "io.containerd.runc.v2"
    assert kata["options"] == {"BinaryName": INSTALLED_LAUNCHER}
    assert cri["default_runtime_name"] == "runc"  # pods that do not ask for kata keep runc


def test_the_guide_points_at_the_file_and_holds_no_copy_of_it():
    guide = GUIDE.read_text()
    assert "deploy/containerd/config.toml" in guide
    assert not re.search(r"```toml", guide)
    assert "[plugins." not in guide.replace('[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata]', "")
