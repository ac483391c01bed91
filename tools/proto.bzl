"""py_proto: Python (and gRPC) stubs for one .proto, importable by its path."""

def py_proto(name, src, grpc = False, visibility = None):
    """Generates <stem>_pb2.py (+ .pyi, + <stem>_pb2_grpc.py) and a py_library `name`.

    The stubs land beside the .proto in bazel-bin, so `from protocols.cache
    import cache_pb2` works in binaries and tests (runfiles root is on sys.path).
    """
    stem = src[:-len(".proto")]
    outs = [stem + "_pb2.py", stem + "_pb2.pyi"]
    flags = "--python_out=$(GENDIR) --pyi_out=$(GENDIR)"
    if grpc:
        outs.append(stem + "_pb2_grpc.py")
        flags += " --grpc_python_out=$(GENDIR)"
    native.genrule(
        name = name + "_gen",
        srcs = [src],
        outs = outs,
        tools = ["//tools:protoc"],
        cmd = "$(location //tools:protoc) -I. %s $(location %s)" % (flags, src),
    )
    native.py_library(
        name = name,
        srcs = [o for o in outs if o.endswith(".py")],
        # The .pyi types reach the runfiles for mypy (//tests/static:mypy_test).
        data = [o for o in outs if o.endswith(".pyi")],
        visibility = visibility,
    )
