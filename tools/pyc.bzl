"""py_bytecode: a py_binary's own modules compiled to .pyc in its runfiles.

Runfiles are read-only symlinks, so an interpreter cannot cache the bytecode it compiles there
(nor anywhere with PYTHONDONTWRITEBYTECODE): without this every run of a command compiles each
of the project's modules again, ~60 ms of `kata-runtime run`'s imports on a loaded 2-core machine.
The .pyc files are checked-hash ones: a source edited after the build is compiled afresh, never
run stale. Add the target to the binary's data.
"""

def _py_bytecode_impl(ctx):
    sources = depset(
        ctx.files.srcs,
        transitive = [dep[PyInfo].transitive_sources for dep in ctx.attr.deps if PyInfo in dep],
    ).to_list()
    by_dir = {}
    for src in sources:
        # This workspace's modules only (an external repository's runfiles path starts with "../").
        if src.extension == "py" and not src.short_path.startswith("../"):
            by_dir.setdefault(src.short_path.rpartition("/")[0], []).append(src)
    symlinks = {}
    for directory, files in by_dir.items():
        # One __pycache__ per package, named by the interpreter's cache tag when the action runs.
        cache = ctx.actions.declare_directory("%s.pyc/%s/__pycache__" % (ctx.label.name, directory))
        args = ctx.actions.args()
        args.add(cache.path)
        args.add_all(files)
        ctx.actions.run(
            executable = ctx.executable._compiler,
            arguments = [args],
            inputs = files,
            outputs = [cache],
            mnemonic = "PyBytecode",
            progress_message = "Compiling %s to bytecode" % (directory or "."),
        )
        symlinks[(directory + "/" if directory else "") + "__pycache__"] = cache
    return [DefaultInfo(runfiles = ctx.runfiles(symlinks = symlinks))]

py_bytecode = rule(
    implementation = _py_bytecode_impl,
    attrs = {
        "srcs": attr.label_list(allow_files = [".py"]),
        "deps": attr.label_list(),
        "_compiler": attr.label(default = "//tools:pycompile", executable = True, cfg = "exec"),
    },
    doc = "The .pyc files of srcs and deps' transitive sources, at their __pycache__ runfiles paths.",
)
