"""cython_extension: a .pyx compiled by Cython, then by the C toolchain, into an importable .so."""

def cython_extension(name, pyx, package, deps = [], visibility = None):
    """Builds `<package>.<name>` from `pyx` and a py_library `name` carrying the .so.

    The .so sits at <package>/<name>.so in runfiles: Python's plain ".so"
    extension suffix lets `from <package> import <name>` find it.
    """
    c_file = name + ".c"
    native.genrule(
        name = name + "_cythonize",
        srcs = [pyx],
        outs = [c_file],
        tools = ["//tools:cython"],
        cmd = "$(location //tools:cython) -3 --module-name %s.%s -o $@ $(location %s)" % (package, name, pyx),
    )
    native.cc_binary(
        name = name + ".so",
        srcs = [c_file],
        linkshared = True,
        copts = ["-O2", "-Wno-unused-function", "-Wno-unreachable-code"],
        deps = ["@project_python//:python_headers"],
    )
    native.py_library(
        name = name,
        data = [":" + name + ".so"],
        deps = deps,
        visibility = visibility,
    )
