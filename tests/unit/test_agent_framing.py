"""protocols/agent/framing.py: the length-prefixed frames both ends of the agent channel use."""
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.agent.framing import (
    HEADER_BYTES,
    MAX_FRAME_BYTES,
    FrameDecoder,
    FrameTooLargeError,
    OversizedFrame,
    encode_frame,
)


def test_encode_is_big_endian_length_then_payload():
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"") == b"\x00\x00\x00\x00"


def test_encode_refuses_payload_over_limit():
    with pytest.raises(FrameTooLargeError, match=str(MAX_FRAME_BYTES)):
        encode_frame(bytes(MAX_FRAME_BYTES + 1))
    assert len(encode_frame(bytes(MAX_FRAME_BYTES))) == MAX_FRAME_BYTES + HEADER_BYTES


def test_decoder_returns_frames_completed_by_each_chunk():
    decoder = FrameDecoder()
    stream = encode_frame(b"one") + encode_frame(b"") + encode_frame(b"three")
    assert decoder.feed(stream[:5]) == []
    assert decoder.pending_bytes == 5
    assert decoder.feed(stream[5:]) == [b"one", b"", b"three"]
    assert decoder.pending_bytes == 0


def test_oversized_frame_is_reported_and_skipped_without_buffering():
    decoder = FrameDecoder(max_frame_bytes=10)
    big = struct.pack(">I", 1000) + bytes(1000)
    stream = encode_frame(b"before") + big + encode_frame(b"after")
    items = decoder.feed(stream[:50])
    assert items == [b"before", OversizedFrame(1000)]
    # Only the skip count is kept, not the oversized payload.
    assert decoder.pending_bytes == 1000 - (50 - 10 - 4)
    assert decoder.feed(stream[50:]) == [b"after"]
    assert "1000 bytes" in OversizedFrame(1000).describe()


def test_reset_drops_a_partial_frame():
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"half a frame")[:7])
    decoder.reset()
    assert decoder.feed(encode_frame(b"next")) == [b"next"]


def test_reset_drops_an_oversized_skip_in_progress():
    decoder = FrameDecoder(max_frame_bytes=4)
    assert decoder.feed(struct.pack(">I", 100) + b"xx") == [OversizedFrame(100)]
    decoder.reset()
    assert decoder.feed(encode_frame(b"ok")) == [b"ok"]


payloads = st.lists(
    st.one_of(st.binary(max_size=40), st.integers(41, 200).map(lambda n: OversizedFrame(n))),
    max_size=12,
)


def _encode(item):
    if isinstance(item, OversizedFrame):
        return struct.pack(">I", item.length) + (b"\xab" * item.length)
    return encode_frame(item)


@settings(max_examples=300, deadline=None)
@given(items=payloads, cuts=st.lists(st.integers(min_value=0), max_size=30))
def test_any_chunking_yields_the_same_frames(items, cuts):
    stream = b"".join(_encode(item) for item in items)
    whole = FrameDecoder(max_frame_bytes=40).feed(stream)
    assert whole == items

    positions = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    decoder = FrameDecoder(max_frame_bytes=40)
    chunked = []
    for start, end in zip(positions, positions[1:]):
        chunked.extend(decoder.feed(stream[start:end]))
    assert chunked == items
    assert decoder.pending_bytes == 0
