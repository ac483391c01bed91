"""The GrpcVM wire codec: Cython and pure Python agree, and protobuf agrees with both."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from native import vmstate, vmstate_pure
from protocols.cache import cache_pb2

u32 = st.integers(0, 2**32 - 1)
fields = st.tuples(st.text(max_size=40), st.binary(max_size=300), st.integers(-2**63, 2**63 - 1),
                   st.text(max_size=20), u32, u32, u32)


@given(fields)
def test_encoders_agree_with_each_other_and_with_protobuf(values):
    ours = vmstate.encode_grpc_vm(*values)
    assert ours == vmstate_pure.encode_grpc_vm(*values)
    vm_id, hv, pid, url, cpu, mem, delta = values
    message = cache_pb2.GrpcVM(id=vm_id, hypervisor=hv, proxyPid=pid, proxyURL=url, cpu=cpu, memory=mem, cpuDelta=delta)
    assert cache_pb2.GrpcVM.FromString(ours) == message
    assert ours == message.SerializeToString(deterministic=True)


@given(fields)
def test_decoders_round_trip(values):
    raw = vmstate_pure.encode_grpc_vm(*values)
    assert tuple(vmstate.decode_grpc_vm(raw)) == values
    assert tuple(vmstate_pure.decode_grpc_vm(raw)) == values


@given(st.binary(max_size=64))
def test_decoders_agree_on_arbitrary_bytes(raw):
    def run(decode):
        try:
            return ("ok", tuple(decode(raw)))
        except (ValueError, UnicodeDecodeError) as err:
            return ("error", type(err).__name__)
    assert run(vmstate.decode_grpc_vm) == run(vmstate_pure.decode_grpc_vm)


def test_unknown_fields_are_skipped():
    raw = vmstate_pure.encode_grpc_vm("a", b"h", 0, "", 1, 2, 0) + bytes([0x48, 0x05])  # field 9 varint
    assert vmstate.decode_grpc_vm(raw).memory == 2


def test_out_of_range_cpu_is_refused():
    with pytest.raises(ValueError, match="out of range"):
        vmstate.encode_grpc_vm("a", b"", 0, "", 2**32, 0, 0)


DECODERS = [vmstate.decode_grpc_vm, vmstate_pure.decode_grpc_vm]


@pytest.mark.parametrize("decode", DECODERS)
@given(fields, st.data())
def test_every_truncation_of_a_valid_message_decodes_or_fails_cleanly(decode, values, data):
    """A short read from a hostile or dying server: never a crash, only a ValueError."""
    raw = vmstate_pure.encode_grpc_vm(*values)
    cut = data.draw(st.integers(0, len(raw)))
    try:
        decode(raw[:cut])
    except ValueError:
        pass


@pytest.mark.parametrize("decode", DECODERS)
@given(st.binary(max_size=512), st.sampled_from([b"", b"\x0a", b"\x12", b"\x22", b"\x0a\xff", b"\x09", b"\x0d"]))
def test_random_bytes_decode_or_fail_with_a_value_error(decode, raw, prefix):
    try:
        decode(prefix + raw)
    except ValueError as err:
        assert "GrpcVM" in str(err)


@pytest.mark.parametrize("decode", DECODERS)
@pytest.mark.parametrize("length", [2**63 - 1, 2**63 - 2, 2**62, 2**32, 2**31 - 1])
def test_a_length_that_would_overflow_the_bounds_check_is_refused(decode, length):
    """pos + length wraps around for lengths near 2**63: the check must not be fooled into reading."""
    raw = bytearray(b"\x08\x01\x12")  # a varint field, then field 2 with our length
    vmstate_pure._varint(length, raw)
    raw += b"abc"
    with pytest.raises(ValueError, match="truncated length-delimited field"):
        decode(bytes(raw))
