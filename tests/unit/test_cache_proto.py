"""cache.proto is the upstream Kata wire format, field for field."""
from google.protobuf import descriptor

from protocols.cache import cache_pb2, cache_pb2_grpc

T = descriptor.FieldDescriptor

# From upstream kata-containers protocols/cache/cache.proto.
UPSTREAM_MESSAGES = {
    "GrpcVMConfig": [("Data", 1, T.TYPE_BYTES, False), ("AgentConfig", 2, T.TYPE_BYTES, False)],
    "GrpcVM": [
        ("id", 1, T.TYPE_STRING, False),
        ("hypervisor", 2, T.TYPE_BYTES, False),
        ("proxyPid", 3, T.TYPE_INT64, False),
        ("proxyURL", 4, T.TYPE_STRING, False),
        ("cpu", 5, T.TYPE_UINT32, False),
        ("memory", 6, T.TYPE_UINT32, False),
        ("cpuDelta", 7, T.TYPE_UINT32, False),
    ],
    "GrpcStatus": [("pid", 1, T.TYPE_INT64, False), ("vmstatus", 2, T.TYPE_MESSAGE, True)],
    "GrpcVMStatus": [
        ("pid", 1, T.TYPE_INT64, False),
        ("cpu", 2, T.TYPE_UINT32, False),
        ("memory", 3, T.TYPE_UINT32, False),
    ],
}

UPSTREAM_METHODS = {
    "Config": ("google.protobuf.Empty", "cache.GrpcVMConfig"),
    "GetBaseVM": ("google.protobuf.Empty", "cache.GrpcVM"),
    "Status": ("google.protobuf.Empty", "cache.GrpcStatus"),
    "Quit": ("google.protobuf.Empty", "google.protobuf.Empty"),
}


def _is_repeated(field) -> bool:
    # protobuf >= 5 has is_repeated; older runtimes only have label.
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == T.LABEL_REPEATED


def test_package_and_messages_match_upstream():
    file = cache_pb2.DESCRIPTOR
    assert file.package == "cache"
    assert set(file.message_types_by_name) == set(UPSTREAM_MESSAGES)
    for name, fields in UPSTREAM_MESSAGES.items():
        got = [(f.name, f.number, f.type, _is_repeated(f)) for f in file.message_types_by_name[name].fields]
        assert got == fields, name
    assert (file.message_types_by_name["GrpcStatus"].fields_by_name["vmstatus"].message_type.full_name
            == "cache.GrpcVMStatus")


def test_service_matches_upstream():
    service = cache_pb2.DESCRIPTOR.services_by_name["CacheService"]
    assert service.full_name == "cache.CacheService"
    got = {m.name: (m.input_type.full_name, m.output_type.full_name) for m in service.methods}
    assert got == UPSTREAM_METHODS
    for m in service.methods:
        assert not m.client_streaming and not m.server_streaming


def test_grpc_stubs_name_the_upstream_paths():
    assert hasattr(cache_pb2_grpc, "CacheServiceStub")
    assert hasattr(cache_pb2_grpc, "add_CacheServiceServicer_to_server")
