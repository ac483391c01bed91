"""`bazel run //:install` puts kata-runtime where it outlives the Bazel output base, and takes it back."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.integration.bundles import make_bundle
from tests.integration.vmtest import write_config

INSTALL = "tools/install"


def _install(prefix: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([INSTALL, "--prefix", prefix, "--sysconfdir", f"{prefix}/etc", *extra],
                          capture_output=True, text=True, timeout=120)


def test_the_installed_runtime_runs_a_container_from_its_installed_assets_and_uninstall_removes_it(run_root):
    prefix = os.path.join(run_root, "usr")
    done = _install(prefix)
    assert done.returncode == 0, done.stderr
    runtime = os.path.join(prefix, "bin", "kata-runtime")
    share = os.path.join(prefix, "share", "kata-vmfactory")

    env = json.loads(subprocess.run([runtime, "env"], capture_output=True, text=True, check=True).stdout)
    assert env["Runtime"]["Config"] == f"{prefix}/etc/kata-containers/configuration.toml"
    assert env["Kernel"]["Path"] == f"{share}/vmlinux"
    assert env["Initrd"]["Path"] == f"{share}/initramfs.cpio.lz4"
    assert "bazel-out" not in json.dumps(env)

    # The installed assets, everything else under the test's root.
    config = write_config(run_root, template=False, cache=0, initrd=f"{share}/initramfs.cpio.lz4")
    bundle = make_bundle(os.path.join(run_root, "bundle"), ["uname", "-s"])
    ran = subprocess.run([runtime, "--root", os.path.join(run_root, "state"), "--config", config,
                          "run", "installed", "--bundle", bundle], capture_output=True, text=True, timeout=300)
    assert (ran.returncode, ran.stdout) == (0, "Linux\n"), ran.stderr

    again = _install(prefix)
    assert again.returncode == 1 and "already installed" in again.stderr

    removed = _install(prefix, "--uninstall")
    assert removed.returncode == 0, removed.stderr
    assert not Path(prefix).exists(), sorted(str(p) for p in Path(prefix).rglob("*"))


def test_uninstall_keeps_a_configuration_edited_since_install(run_root):
    prefix = os.path.join(run_root, "usr")
    assert _install(prefix).returncode == 0
    config = Path(prefix, "etc", "kata-containers", "configuration.toml")
    config.write_text(config.read_text() + "\n# the operator's own edit\n")
    removed = _install(prefix, "--uninstall")
    assert removed.returncode == 0, removed.stderr
    assert f"kept {config}" in removed.stdout
    assert [p for p in Path(prefix).rglob("*") if p.is_file()] == [config]
