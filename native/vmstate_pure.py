"""Pure-Python twin of native.vmstate: the GrpcVM wire codec.

A VM crosses the VMCache socket as a cache.GrpcVM message; this writes and
reads its protobuf wire form directly (fields in number order, proto3
defaults omitted: the bytes protobuf itself would write), so the hot path of
GetBaseVM does not build message objects. Decoding skips unknown fields, as
protobuf does, so a newer peer's extra fields are harmless.
"""
from __future__ import annotations

from typing import Any, NamedTuple


class GrpcVMFields(NamedTuple):
    id: str
    hypervisor: bytes
    proxy_pid: int
    proxy_url: str
    cpu: int
    memory: int
    cpu_delta: int


_U64 = (1 << 64) - 1


def _varint(value: int, out: bytearray) -> None:
    value &= _U64  # int64 negatives are ten-byte two's complement varints
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def encode_grpc_vm(vm_id: str, hypervisor: bytes, proxy_pid: int, proxy_url: str,
                   cpu: int, memory: int, cpu_delta: int) -> bytes:
    out = bytearray()
    for tag, raw in ((0x0A, vm_id.encode()), (0x12, bytes(hypervisor))):
        if raw:
            out.append(tag)
            _varint(len(raw), out)
            out += raw
    if proxy_pid:
        out.append(0x18)
        _varint(proxy_pid, out)
    raw = proxy_url.encode()
    if raw:
        out.append(0x22)
        _varint(len(raw), out)
        out += raw
    for tag, value in ((0x28, cpu), (0x30, memory), (0x38, cpu_delta)):
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"uint32 field out of range: {value}")
        if value:
            out.append(tag)
            _varint(value, out)
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint in GrpcVM")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & _U64, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint too long in GrpcVM")


def decode_grpc_vm(data: bytes) -> GrpcVMFields:
    # Field number -> value; typed as the NamedTuple fields they become.
    fields: dict[int, Any] = {1: "", 2: b"", 3: 0, 4: "", 5: 0, 6: 0, 7: 0}
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
            if number == 3:
                fields[3] = value - (1 << 64) if value >> 63 else value
            elif number in (5, 6, 7):
                fields[number] = value & 0xFFFFFFFF
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            if length > end - pos:
                raise ValueError("truncated length-delimited field in GrpcVM")
            chunk = data[pos:pos + length]
            pos += length
            if number in (1, 4):
                try:
                    fields[number] = chunk.decode()
                except UnicodeDecodeError as err:
                    raise ValueError(f"GrpcVM field {'id' if number == 1 else 'proxy_url'} is not UTF-8: "
                                     f"{err}") from None
            elif number == 2:
                fields[2] = bytes(chunk)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire} in GrpcVM")
        if pos > end:
            raise ValueError("truncated fixed-width field in GrpcVM")
    return GrpcVMFields(fields[1], fields[2], fields[3], fields[4], fields[5], fields[6], fields[7])
