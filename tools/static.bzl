"""py_sources: a package's own Python files, for the static checks in //tests/static."""

def py_sources():
    # The checks read every file of the tree; declaring them makes Bazel re-run the checks when any
    # of them changes (an undeclared file would leave a stale cached pass).
    native.filegroup(
        name = "py_sources",
        srcs = native.glob(["**/*.py"]),
        visibility = ["//tests/static:__pkg__"],
    )
