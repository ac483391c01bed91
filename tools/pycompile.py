"""pycompile OUT_DIR SOURCE...: checked-hash .pyc files of SOURCEs (one package) into OUT_DIR,
named as the interpreter's import system looks for them in __pycache__ (tools/pyc.bzl)."""
import importlib.util
import os
import py_compile
import sys


def main(argv: list[str]) -> int:
    out_dir, *sources = argv[1:]
    os.makedirs(out_dir, exist_ok=True)
    for source in sources:
        cached = os.path.basename(importlib.util.cache_from_source(source))
        py_compile.compile(source, cfile=os.path.join(out_dir, cached), doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
