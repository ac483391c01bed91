"""Local repository rules: the project builds with no network at all.

Bazel 4's WORKSPACE suffix fetches @rules_cc, @rules_java and
@remote_coverage_tools over HTTP; defining them first as local repositories
makes its `maybe()` calls skip the download.
"""

# Where tools/bootstrap.sh puts things; overridable for unusual hosts.
_DEFAULT_STATE_DIR = "/var/cache/kata-vmfactory"

def _forwarding_rules_impl(rctx):
    rctx.file("BUILD.bazel", "")
    for path, content in rctx.attr.files.items():
        rctx.file(path, content)

_forwarding_rules = repository_rule(
    implementation = _forwarding_rules_impl,
    attrs = {"files": attr.string_dict()},
)

_CC_DEFS = """
def cc_binary(**kwargs):
    native.cc_binary(**kwargs)

def cc_library(**kwargs):
    native.cc_library(**kwargs)

def cc_test(**kwargs):
    native.cc_test(**kwargs)

def cc_import(**kwargs):
    native.cc_import(**kwargs)

def cc_proto_library(**kwargs):
    native.cc_proto_library(**kwargs)

def cc_toolchain(**kwargs):
    native.cc_toolchain(**kwargs)

def cc_toolchain_suite(**kwargs):
    native.cc_toolchain_suite(**kwargs)
"""

_JAVA_DEFS = """
def java_binary(**kwargs):
    native.java_binary(**kwargs)

def java_library(**kwargs):
    native.java_library(**kwargs)

def java_import(**kwargs):
    native.java_import(**kwargs)

def java_test(**kwargs):
    native.java_test(**kwargs)

def java_toolchain(**kwargs):
    native.java_toolchain(**kwargs)

def java_runtime(**kwargs):
    native.java_runtime(**kwargs)
"""

_COVERAGE_BUILD = """
package(default_visibility = ["//visibility:public"])

# Coverage is not used here; Bazel only needs these labels to exist.
sh_binary(name = "Main", srcs = ["noop.sh"])
sh_binary(name = "lcov_merger", srcs = ["noop.sh"])
sh_binary(name = "coverage_report_generator", srcs = ["noop.sh"])
filegroup(name = "coverage_support", srcs = [])
"""

def _coverage_tools_impl(rctx):
    rctx.file("noop.sh", "#!/bin/sh\nexit 0\n", executable = True)
    rctx.file("BUILD.bazel", _COVERAGE_BUILD)

_coverage_tools = repository_rule(implementation = _coverage_tools_impl)

def offline_standins():
    _forwarding_rules(
        name = "rules_cc",
        files = {"cc/BUILD.bazel": "", "cc/defs.bzl": _CC_DEFS},
    )
    _forwarding_rules(
        name = "rules_java",
        files = {"java/BUILD.bazel": "", "java/defs.bzl": _JAVA_DEFS},
    )
    _coverage_tools(name = "remote_coverage_tools")

def _state_dir(rctx):
    return rctx.os.environ.get("KATA_VMFACTORY_STATE", _DEFAULT_STATE_DIR)

_PYTHON_BUILD = """
load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")

package(default_visibility = ["//visibility:public"])

py_runtime(
    name = "py3_runtime",
    interpreter_path = "{interpreter}",
    python_version = "PY3",
    stub_shebang = "#!{interpreter}",
)

py_runtime_pair(
    name = "runtime_pair",
    py3_runtime = ":py3_runtime",
)

toolchain(
    name = "python_toolchain",
    toolchain = ":runtime_pair",
    toolchain_type = "@bazel_tools//tools/python:toolchain_type",
)

# Headers of the interpreter the venv runs on, for Cython extensions.
cc_library(
    name = "python_headers",
    hdrs = glob(["include/**/*.h"]),
    includes = ["include"],
)

exports_files(["interpreter.txt"])
"""

def _project_python_impl(rctx):
    # Reading the requirements by label makes Bazel re-run this rule (and so
    # pick up a re-provisioned venv) whenever the pins change.
    rctx.read(rctx.attr.requirements)
    venv = rctx.os.environ.get("KATA_VMFACTORY_VENV", _state_dir(rctx) + "/venv")

    # The venv's own path, never a resolved one: Python finds pyvenv.cfg next
    # to the path it was started from, so a symlink would lose the packages.
    interpreter = venv + "/bin/python3"
    probe = rctx.execute([interpreter, "-c", "import sysconfig; print(sysconfig.get_paths()['include'])"])
    if probe.return_code != 0:
        fail("The project venv is missing or broken at %s (%s). Run ./bazelw, which provisions it, or tools/bootstrap.sh." % (venv, probe.stderr.strip()))
    rctx.symlink(probe.stdout.strip(), "include")
    rctx.file("interpreter.txt", interpreter + "\n")
    rctx.file("BUILD.bazel", _PYTHON_BUILD.format(interpreter = interpreter))

project_python_repository = repository_rule(
    implementation = _project_python_impl,
    attrs = {"requirements": attr.label(allow_single_file = True)},
    environ = ["KATA_VMFACTORY_VENV", "KATA_VMFACTORY_STATE"],
    local = True,
)

_KERNEL_BUILD = """
package(default_visibility = ["//visibility:public"])

exports_files(["kernel.json", "vmlinux"])
"""

def _guest_kernel_impl(rctx):
    current = rctx.path(_state_dir(rctx) + "/kernel/current")
    if not current.exists:
        fail("No guest kernel at %s. Run ./bazelw (or tools/bootstrap.sh), which downloads Debian's kernel package into it." % current)

    # Resolved paths, so the repository changes when bootstrap moves `current`
    # to a newer kernel.
    meta = rctx.path(str(current) + "/kernel.json")
    rctx.symlink(meta, "kernel.json")
    rctx.symlink(rctx.path(str(current) + "/vmlinux"), "vmlinux")
    rctx.file("BUILD.bazel", _KERNEL_BUILD)

guest_kernel_repository = repository_rule(
    implementation = _guest_kernel_impl,
    environ = ["KATA_VMFACTORY_STATE"],
    local = True,
)
