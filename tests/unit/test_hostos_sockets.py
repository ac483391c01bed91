"""Unix sockets at paths longer than sun_path: Docker's runc root for kata-runtime
(/var/run/docker/runtime-kata/moby/<64-hex id>/shim.sock) is 108 bytes."""
from __future__ import annotations

import os
import socket

import pytest

from hostos import sockets


@pytest.fixture
def deep_dir(tmp_path):
    path = tmp_path / ("d" * 60) / ("e" * 60)
    path.mkdir(parents=True)
    return path


def test_a_socket_binds_and_accepts_at_a_path_longer_than_sun_path(deep_dir):
    path = str(deep_dir / "shim.sock")
    assert len(path) > sockets.MAX_PATH_BYTES
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        with pytest.raises(OSError):
            server.bind(path)  # what the shim did before
        sockets.bind(server, path)
        server.listen(1)
        assert os.path.exists(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            sockets.connect(client, path)
            peer, _ = server.accept()
            with peer:
                client.sendall(b"hello")
                assert peer.recv(5) == b"hello"
        assert sockets.is_listening(path)


def test_no_descriptor_is_left_open_after_binding_or_connecting_at_a_long_path(deep_dir):
    path = str(deep_dir / "shim.sock")
    before = set(os.listdir("/proc/self/fd"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        sockets.bind(server, path)
        server.listen(1)
        assert sockets.is_listening(path)
    assert set(os.listdir("/proc/self/fd")) == before


def test_a_long_path_nobody_listens_on_is_stale(deep_dir):
    path = str(deep_dir / "shim.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        sockets.bind(server, path)
    assert not sockets.is_listening(path)
    assert sockets.remove_stale(path) and not os.path.exists(path)


def test_a_short_path_is_used_as_it_is(tmp_path):
    path = "/tmp/" + os.path.basename(str(tmp_path))[:20] + ".sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        sockets.bind(server, path)
        try:
            assert server.getsockname() == path
        finally:
            os.unlink(path)
