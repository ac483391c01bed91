"""The shim's control channel: frames decode the same however the bytes are split, fds arrive
with their request, and the per-container lock makes commands on one id take turns."""
from __future__ import annotations

import asyncio
import os
import socket
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostos import locks
from runtime.sandbox import control
from runtime.sandbox.state import ContainerError, StateStore

messages = st.lists(st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=40), max_size=4),
                    min_size=1, max_size=6)


@given(messages, st.data())
def test_any_split_of_the_byte_stream_decodes_to_the_same_messages(sent, data):
    stream = b"".join(control.encode(m) for m in sent)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = control.FrameDecoder()
    received = []
    for start, end in zip([0] + cuts, cuts + [len(stream)]):
        received.extend(decoder.feed(stream[start:end]))
    assert received == sent
    assert decoder.pending == 0


def test_a_length_over_the_limit_is_refused_before_buffering():
    decoder = control.FrameDecoder()
    with pytest.raises(control.FrameError, match="over"):
        decoder.feed(control.HEADER.pack(control.MAX_PAYLOAD + 1))


def test_a_payload_that_is_not_a_json_object_is_refused():
    for payload in (b"{not json", b"[1, 2]"):
        with pytest.raises(control.FrameError):
            control.FrameDecoder().feed(control.HEADER.pack(len(payload)) + payload)


def test_two_replies_in_one_read_are_two_replies():
    # The bug this channel replaced: `exit 3` read back as a JSONDecodeError and status 1.
    ours, theirs = socket.socketpair()
    with control.Connection(ours) as conn:
        theirs.sendall(control.encode({"ok": True}) + control.encode({"exit_status": 3}))
        assert conn.read_reply() == {"ok": True}
        assert conn.read_reply() == {"exit_status": 3}
    theirs.close()


def test_an_error_reply_is_raised_with_its_message():
    ours, theirs = socket.socketpair()
    with control.Connection(ours) as conn:
        theirs.sendall(control.encode({"error": "container c1 stopped: its VM exited"}))
        with pytest.raises(ContainerError, match="its VM exited"):
            conn.read_reply()
    theirs.close()


def test_a_shim_dying_mid_reply_is_an_error_not_a_partial_reply():
    ours, theirs = socket.socketpair()
    with control.Connection(ours) as conn:
        theirs.sendall(control.encode({"exit_status": 3})[:-2])
        theirs.close()
        with pytest.raises(ContainerError, match="in the middle of a reply"):
            conn.read_reply()


def test_the_request_arrives_with_the_callers_fds(tmp_path):
    path = str(tmp_path / "s.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    out_r, out_w = os.pipe()
    big = {"op": "exec", "process": {"args": ["x" * 200_000]}}  # spans many reads

    async def receive():
        sock, _ = await asyncio.get_running_loop().sock_accept(server)
        sock.setblocking(False)
        with sock:
            return await control.receive_request(sock)

    server.setblocking(False)
    sender = threading.Thread(target=lambda: control.request(path, big, fds=[out_w, out_w]).sock.close())
    sender.start()
    try:
        request, fds = asyncio.run(receive())
    finally:
        sender.join()
        server.close()
    assert request == big and len(fds) == 2
    os.write(fds[0], b"through the passed fd")
    assert os.read(out_r, 100) == b"through the passed fd"
    for fd in fds + [out_r, out_w]:
        os.close(fd)


def test_commands_on_one_container_take_turns(tmp_path):
    store = StateStore(str(tmp_path))
    held = store.lock("c1")
    got_it = threading.Event()

    def second_command():
        fd = store.lock("c1")
        got_it.set()
        os.close(fd)

    waiter = threading.Thread(target=second_command)
    waiter.start()
    try:
        assert not got_it.wait(0.3)  # bounded look that it is still waiting; no timing claim
    finally:
        os.close(held)
        waiter.join(10)
    assert got_it.is_set()


def test_removing_a_held_lock_file_never_admits_two_holders(tmp_path):
    path = str(tmp_path / "c1.lock")
    first = locks.acquire(path, 1)
    waiting: dict[str, int] = {}
    waiter = threading.Thread(target=lambda: waiting.update(fd=locks.acquire(path, 10)))
    waiter.start()
    locks.remove(path)  # the holder deletes the container, then releases
    os.close(first)
    waiter.join(10)
    # The waiter woke on the unlinked inode, saw it, and took the lock on a new file at `path`.
    assert os.fstat(waiting["fd"]).st_ino == os.stat(path).st_ino
    with pytest.raises(locks.LockTimeoutError):
        locks.acquire(path, 0.05)
    os.close(waiting["fd"])


def test_a_relative_root_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert StateStore("state").root == tmp_path / "state"
