"""grpc_tools' protoc with its bundled well-known types on the include path.

Bazel genrules call this instead of a system protoc: the generated code must
match the pinned protobuf runtime, and grpc_tools carries the matching compiler.
"""
import sys
from importlib import resources

import grpc_tools
from grpc_tools import protoc


def main() -> int:
    well_known = str(resources.files(grpc_tools) / "_proto")
    return protoc.main(["protoc", f"-I{well_known}", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
