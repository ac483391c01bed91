"""The VMCache systemd unit, rendered as `install` writes it, passes systemd-analyze verify."""
import os
import subprocess

import pytest

from deploy.systemd import unit


def test_the_rendered_unit_passes_systemd_analyze_verify(tmp_path):
    server = os.path.abspath("vmcache/server")  # the real binary, from this test's runfiles
    path = tmp_path / unit.UNIT_NAME
    path.write_text(unit.render(server, "/etc/kata-containers/configuration.toml"))
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no warnings either
    text = path.read_text()
    for line in ("Type=notify", "Restart=on-failure", "RuntimeDirectory=kata-containers", f"ExecStart={server} "):
        assert line in text


def test_paths_systemd_would_split_are_refused():
    with pytest.raises(ValueError, match="must be absolute and without spaces"):
        unit.render("/opt/my dir/server", "/etc/kata-containers/configuration.toml")
