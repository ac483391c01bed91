"""kata-runtime: the VM-isolated container runtime's command line.

Usage: kata-runtime [flags] COMMAND [ARGS...]

Global flags: --config PATH (else $KATA_CONF_FILE, the default locations,
then the built-in configuration.toml), --root DIR (container state),
--debug, --log FILE.

Commands (OCI lifecycle, as runc):
  spec [--bundle DIR]                  write a default config.json into the bundle
  create ID --bundle DIR [--pid-file F]
                                       create a container in a VM from the factory
  start ID                             start its process
  state ID                             print its OCI state as JSON
  kill ID [SIGNAL]                     signal its process (default SIGTERM)
  wait ID                              wait for its process to exit; exit with its code
  delete [--force] ID                  stop its VM and remove it
  run ID --bundle DIR                  create, start, wait; exit with the process's code
  exec ID -- CMD [ARGS...]             run another process in a running container
  list [--format table|json]           list containers

Other commands:
  factory init|status|destroy|gc
            manage the VM factory: init creates the template or runs the
            VMCache server (in the foreground); status [--json]; destroy
            (works with the server dead too); gc reaps VMs of dead owners
  check     check that this host can run factory VMs (QEMU, migration capability,
            kernel, initramfs, accelerator, tmpfs, run root)
  env       show the guest kernel, initramfs, QEMU and the accelerator chosen (and why)
  version   print the runtime's version
"""
import os
import sys
from typing import Callable, Sequence

from absl import app, flags, logging

from runtime.version import RUNTIME_VERSION

flags.DEFINE_string("config", None, "configuration.toml to use")
flags.DEFINE_bool("json", False, "factory status: print JSON")
flags.DEFINE_string("root", "/run/kata-vmfactory", "directory for container state")
flags.DEFINE_bool("debug", False, "show which factory path each sandbox used and how long each phase took")
flags.DEFINE_string("log", None, "write the runtime's log to this file")
flags.DEFINE_string("bundle", None, "create, run, spec: the OCI bundle directory (default: current directory)")
flags.DEFINE_string("pid_file", None, "create: write the container process's pid (in the guest) here")
flags.DEFINE_string("console_socket", "", "create: the Unix socket to send the terminal's pty master to "
                    "(process.terminal)")
flags.DEFINE_bool("force", False, "delete: also a running container")
flags.DEFINE_enum("format", "table", ["table", "json"], "list: output format")
flags.DEFINE_integer("status_fd", -1, "internal: the shim's status pipe")
flags.DEFINE_integer("lock_fd", -1, "internal: the container's lock, held by the shim until create is over")
FLAGS = flags.FLAGS
# The shim's log and one rotated predecessor: hours of a chatty container's warnings, bounded.
SHIM_LOG_MAX_BYTES = 1 << 20


def _version(args: Sequence[str]) -> int:
    print(f"kata-runtime  : {RUNTIME_VERSION}")
    return 0


def _env(args: Sequence[str]) -> int:
    import json

    from configuration import loader
    from factory import assets
    from factory.hypervisor import accelerator
    from factory.hypervisor.binary import qemu_version

    # What this configuration would boot, not the built-in defaults: an install names its own assets.
    config = loader.load(FLAGS.config)
    hv = config.vm_config.hypervisor
    kernel = assets.kernel_info()
    pin = assets.kernel_pin()
    accel = accelerator.choose(hv.accelerator, hv.qemu_path)
    print(json.dumps({
        "Runtime": {"Version": RUNTIME_VERSION, "Config": config.path},
        "Kernel": {"Path": hv.kernel_path, "Package": kernel.get("package", "not installed"),
                   "Version": kernel.get("version", ""), "Release": kernel.get("release", ""),
                   "Pin": pin},
        "Initrd": {"Path": hv.initrd_path},
        "Hypervisor": {"Path": hv.qemu_path, "Version": qemu_version(hv.qemu_path), "Machine": hv.machine,
                       "Accelerator": accel.name, "AcceleratorReason": accel.reason, "CPUModel": accel.cpu_model},
    }, indent=2))
    return 0


def _factory(args: Sequence[str]) -> int:
    from configuration import loader
    from runtime import factory_cli

    return factory_cli.run(loader.load(FLAGS.config), args, sys.stdout, FLAGS.json)


def _check(args: Sequence[str]) -> int:
    from configuration import loader
    from runtime import check

    return check.run(loader.load(FLAGS.config), sys.stdout)


def _store():
    from runtime.sandbox.state import StateStore
    return StateStore(FLAGS.root)


def _bundle() -> str:
    return FLAGS.bundle or os.environ.get("BUILD_WORKING_DIRECTORY") or os.getcwd()


def _one_id(args: Sequence[str], command: str, extra: int = 0) -> str:
    if not args or len(args) > 1 + extra:
        raise app.UsageError(f"{command} takes a container ID" + (" and optional arguments" if extra else ""))
    return args[0]


def _shim_argv() -> list[str]:
    argv = [sys.executable, os.path.abspath(sys.argv[0]), "--root", FLAGS.root]
    if FLAGS.config:
        argv += ["--config", os.path.abspath(FLAGS.config)]
    if FLAGS.console_socket:
        argv += ["--console-socket", os.path.abspath(FLAGS.console_socket)]
    return argv + ["shim"]


def _debug_stream():
    return sys.stderr if FLAGS.debug else None


def _lifecycle(command: str):
    def run_command(args: Sequence[str]) -> int:
        from runtime.sandbox import commands as c
        store = _store()
        if command == "create":
            return c.create(store, _shim_argv(), _one_id(args, command), _bundle(), FLAGS.pid_file, _debug_stream())
        if command == "run":
            return c.run(store, _shim_argv(), _one_id(args, command), _bundle(), _debug_stream())
        if command == "start":
            return c.start(store, _one_id(args, command))
        if command == "state":
            return c.state_json(store, _one_id(args, command), sys.stdout)
        if command == "wait":
            return c.wait(store, _one_id(args, command))
        if command == "kill":
            return c.kill(store, _one_id(args, command, 1), *args[1:2])
        if command == "delete":
            return c.delete(store, _one_id(args, command), FLAGS.force)
        if command == "exec":
            return c.exec_process(store, args[0] if args else "", args[1:], sys.stdout, sys.stderr)
        if command == "list":
            return c.list_containers(store, sys.stdout, FLAGS.format == "json")
        if command == "spec":
            return c.write_spec(_bundle())
        raise AssertionError(command)
    return run_command


def _shim(args: Sequence[str]) -> int:
    import asyncio
    import logging as std_logging
    from logging.handlers import RotatingFileHandler

    from configuration import loader
    from factory import tracing
    from runtime.sandbox.shim import run_shim

    container_id, bundle = args
    store = _store()
    config = loader.load(FLAGS.config)
    log_path = store.dir(container_id) / "shim.log"
    if config.tracing.enabled:
        tracing.setup(config.tracing.exporter, "kata-runtime", config.tracing.otlp_endpoint,
                      out=open(log_path, "a", buffering=1))
    # Capped: the shim logs what the guest says (errors, warnings), and a guest must not fill /run.
    handler = RotatingFileHandler(log_path, maxBytes=SHIM_LOG_MAX_BYTES, backupCount=1)
    handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root_logger = std_logging.getLogger()
    root_logger.handlers[:] = [handler]
    root_logger.setLevel(std_logging.INFO)
    logging.use_python_logging()
    return asyncio.run(run_shim(store, config, container_id, bundle, FLAGS.status_fd, FLAGS.lock_fd,
                                console_socket=FLAGS.console_socket))


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "check": _check,
    "create": _lifecycle("create"),
    "delete": _lifecycle("delete"),
    "exec": _lifecycle("exec"),
    "kill": _lifecycle("kill"),
    "list": _lifecycle("list"),
    "run": _lifecycle("run"),
    "shim": _shim,
    "spec": _lifecycle("spec"),
    "start": _lifecycle("start"),
    "state": _lifecycle("state"),
    "env": _env,
    "factory": _factory,
    "version": _version,
    "wait": _lifecycle("wait"),
}


def main(argv: Sequence[str]) -> int:
    if len(argv) < 2:
        raise app.UsageError("missing COMMAND; one of: " + ", ".join(sorted(COMMANDS)))
    if FLAGS.log:
        import logging as std_logging
        handler = std_logging.FileHandler(FLAGS.log)
        handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        std_logging.getLogger().addHandler(handler)
    command, *args = argv[1:]
    if command not in COMMANDS:
        raise app.UsageError(f"unknown command {command!r}; one of: " + ", ".join(sorted(COMMANDS)))
    from factory.errors import FactoryError
    from runtime.errors import KataRuntimeError

    try:
        return COMMANDS[command](args)
    except (FactoryError, KataRuntimeError) as err:
        print(f"kata-runtime: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        # Whatever the host refused (a path, a permission, a mount) is still one line, not a traceback.
        print(f"kata-runtime: {command}: {err}", file=sys.stderr)
        return 1


def run() -> None:
    app.run(main, flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
    # Flags may follow the command and its ID, as in runc (`run ID --bundle DIR`).
    rest = FLAGS(_underscored(argv), known_only=False)
    # The shim runs in "/": a relative root must name the directory the user meant, from where
    # they ran the command (under `bazel run`, BUILD_WORKING_DIRECTORY).
    FLAGS.root = os.path.join(os.environ.get("BUILD_WORKING_DIRECTORY") or os.getcwd(), FLAGS.root)
    return rest


def _underscored(argv: list[str]) -> list[str]:
    """runc spells flags with dashes (--pid-file); absl knows them with underscores (--pid_file).
    Nothing after "--" is touched: that is a process's command line (exec ID -- CMD ARGS)."""
    out = []
    for index, arg in enumerate(argv):
        if arg == "--":
            return out + argv[index:]
        if arg.startswith("--") and index > 0:
            name, sep, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + sep + value
        out.append(arg)
    return out


if __name__ == "__main__":
    run()
