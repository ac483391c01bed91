"""Length-prefixed framing of the agent protocol (agent.proto), shared by host and guest.

A frame is a 4-byte big-endian payload length followed by the payload (one serialized
agent.Request or agent.GuestMessage). Standard library only: this module runs inside the guest.
"""

from __future__ import annotations

import struct
from typing import List, NamedTuple, Union

# Bumped when a change to agent.proto changes the meaning of existing messages; adding new
# requests does not need a bump (an old agent answers "unsupported request").
PROTOCOL_VERSION = 1
# How the error of that answer starts: a host newer than the agent falls back on older requests.
UNSUPPORTED_REQUEST = "unsupported request"

HEADER = struct.Struct(">I")
HEADER_BYTES = HEADER.size

# Largest payload either side accepts. The biggest message today is a 4 KiB ReadRandom reply and
# process stdio chunks will be a few tens of KiB; the cap bounds what a corrupt or hostile length
# prefix can make the reader buffer (the guest may have little memory).
MAX_FRAME_BYTES = 1 << 20


class FrameTooLargeError(ValueError):
    """A payload given to encode_frame() is over MAX_FRAME_BYTES."""


def encode_frame(payload: bytes) -> bytes:
    """The frame carrying `payload`."""
    if len(payload) > MAX_FRAME_BYTES:
        raise FrameTooLargeError(
            f"payload of {len(payload)} bytes is over MAX_FRAME_BYTES ({MAX_FRAME_BYTES}); "
            "split the data into smaller messages"
        )
    return HEADER.pack(len(payload)) + payload


class OversizedFrame(NamedTuple):
    """Stands in the decoded stream for a frame whose declared length was over the limit.

    Its payload is skipped, not buffered, so the frames after it still decode. (A NamedTuple,
    not a dataclass: dataclasses imports inspect, which the guest image would have to carry.)
    """

    length: int

    def describe(self) -> str:
        return (
            f"frame of {self.length} bytes is over MAX_FRAME_BYTES ({MAX_FRAME_BYTES}); "
            "its payload was discarded"
        )


DecodedItem = Union[bytes, OversizedFrame]


class FrameDecoder:
    """Incremental decoder: feed() arbitrary chunks, get back the complete frames in order."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._max = max_frame_bytes
        self._buffer = bytearray()
        self._skip = 0  # payload bytes of an oversized frame still to drop

    def reset(self) -> None:
        """Forget any partial frame (the peer went away mid-frame; the next one starts clean)."""
        self._buffer.clear()
        self._skip = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes held for an incomplete frame (0 when the stream is at a frame boundary)."""
        return len(self._buffer) + self._skip

    def feed(self, data: bytes) -> List[DecodedItem]:
        """Consume `data`; return the payloads completed by it, and OversizedFrame markers."""
        items: List[DecodedItem] = []
        view = memoryview(data)
        if self._skip:
            dropped = min(self._skip, len(view))
            self._skip -= dropped
            view = view[dropped:]
        self._buffer += view
        buffer = self._buffer
        pos = 0
        while len(buffer) - pos >= HEADER_BYTES:
            (length,) = HEADER.unpack_from(buffer, pos)
            if length > self._max:
                items.append(OversizedFrame(length))
                available = len(buffer) - pos - HEADER_BYTES
                dropped = min(length, available)
                pos += HEADER_BYTES + dropped
                self._skip = length - dropped
                continue
            end = pos + HEADER_BYTES + length
            if end > len(buffer):
                break
            items.append(bytes(buffer[pos + HEADER_BYTES : end]))
            pos = end
        if pos:
            del buffer[:pos]
        return items
