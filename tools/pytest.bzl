"""pytest_test: one Bazel test target running pytest over its files."""

def pytest_test(name, srcs, deps = [], data = [], args = [], tags = [], **kwargs):
    native.py_test(
        name = name,
        srcs = srcs + ["//tools:pytest_runner.py"],
        main = "//tools:pytest_runner.py",
        args = args + ["$(location %s)" % s for s in srcs if s.split("/")[-1].startswith("test_")],
        deps = deps,
        data = data,
        tags = tags,
        python_version = "PY3",
        **kwargs
    )
