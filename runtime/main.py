"""kata-runtime: the VM-isolated container runtime's command line.

Usage: kata-runtime [global flags] COMMAND [flags] [ARGS...]

Global flags (before or after the command): --config PATH (else $KATA_CONF_FILE,
the default locations, then the built-in configuration.toml), --root DIR
(container state), --debug, --log FILE, --log-format text|json (runc's log
lines; errors always also go to stderr), --systemd-cgroup, --criu PATH and
--rootless VALUE (accepted for runc's callers, without effect: the VM is the
container's boundary), --version.

Commands (OCI lifecycle, as runc; a container's pid is its host process, the shim):
  spec [--bundle DIR]                  write a default config.json into the bundle
  create [--bundle DIR] [--pid-file F] [--console-socket S] [--no-pivot] [--no-new-keyring] ID
                                       create a container in a VM from the factory; its
                                       stdio are this command's
  start ID                             start its process
  state ID                             print its OCI state as JSON
  kill [--all] ID [SIGNAL]             signal its process (default SIGTERM; KILL, SIGKILL or 9)
  wait ID                              wait for its process to exit; exit with its code
  delete [--force] ID                  stop its VM and remove it
  run ID --bundle DIR                  create, start, wait; exit with the process's code
  exec [--process F | -- CMD ARGS] [--detach] [--pid-file F] [--console-socket S]
       [--tty] [--cwd DIR] [--env NAME=VALUE]... ID
                                       run another process in a running container
  ps [--format table|json] ID          its host processes (the shim and each exec's holder)
  pause ID / resume ID                 stop / continue its VM
  update [--resources FILE|-] ID       accepted; resources are not applied to the VM (warning)
  list [--format table|json]           list containers
  features                             what this runtime supports, as runc's JSON

Other commands:
  factory init|status|destroy|gc
            manage the VM factory: init creates the template or runs the
            VMCache server (in the foreground); status [--json]; destroy
            (works with the server dead too); gc reaps VMs of dead owners
  check     check that this host can run factory VMs (QEMU, migration capability,
            kernel, initramfs, accelerator, tmpfs, run root)
  env       show the guest kernel, initramfs, QEMU and the accelerator chosen (and why)
  version   print the runtime's version

Commands but exec and factory run in a fork of the state root's warm server (started by the
first command on the root; it has the runtime imported), with the same output and exit status;
KATA_RUNTIME_WARM=0 runs every command in its own process (README: "Warm commands").
"""
import faulthandler
import json
import logging as std_logging
import os
import sys
from typing import TYPE_CHECKING, Callable, Sequence

from absl import flags

from runtime.version import RUNTIME_VERSION

if TYPE_CHECKING:
    from runtime.warm.anchor import Anchor

# The runtime-spec version this runtime implements, as `--version` reports it.
SPEC_VERSION = "1.0.2"

flags.DEFINE_string("config", None, "configuration.toml to use")
flags.DEFINE_bool("json", False, "factory status: print JSON")
flags.DEFINE_string("root", "/run/kata-vmfactory", "directory for container state")
flags.DEFINE_bool("debug", False, "show which factory path each sandbox used and how long each phase took")
flags.DEFINE_string("log", None, "write the runtime's log to this file")
flags.DEFINE_enum("log_format", "text", ["text", "json"], "format of the --log file, as runc's")
flags.DEFINE_bool("systemd_cgroup", False, "accepted for runc's callers; no effect (the VM is the boundary)")
flags.DEFINE_string("criu", None, "accepted for runc's callers; checkpoint is not supported")
flags.DEFINE_string("rootless", None, "accepted for runc's callers; no effect")
# runc's -v is --version (absl's logging, not imported here, would own -v); _underscored maps it.
flags.DEFINE_bool("help", False, "show this help", short_name="h")
flags.DEFINE_bool("version", False, "print the version, as runc's --version (-v)")
flags.DEFINE_string("bundle", None, "create, run, spec: the OCI bundle directory (default: current directory)",
                    short_name="b")
flags.DEFINE_string("pid_file", None, "create: write the container's host pid here; exec: the exec's")
flags.DEFINE_string("console_socket", None, "create, exec: the AF_UNIX socket that receives a terminal's master")
flags.DEFINE_bool("no_pivot", False, "create: accepted for runc's callers; no effect")
flags.DEFINE_bool("no_new_keyring", False, "create: accepted for runc's callers; no effect")
flags.DEFINE_bool("detach", False, "exec: return once the process runs (its holder keeps it)", short_name="d")
flags.DEFINE_integer("preserve_fds", 0, "create, exec: extra fds to pass (only 0 is supported)")
flags.DEFINE_string("process", None, "exec: the OCI process (JSON file) to run", short_name="p")
flags.DEFINE_bool("tty", False, "exec: give the process a terminal", short_name="t")
flags.DEFINE_string("cwd", None, "exec: the process's working directory")
flags.DEFINE_multi_string("env", [], "exec: add NAME=VALUE to the process's environment", short_name="e")
flags.DEFINE_bool("all", False, "kill: signal every process of the container", short_name="a")
flags.DEFINE_bool("force", False, "delete: also a running container", short_name="f")
flags.DEFINE_enum("format", "table", ["table", "json"], "list, ps: output format")
flags.DEFINE_string("resources", None, "update: the resources JSON file, or - for stdin", short_name="r")
flags.DEFINE_integer("status_fd", -1, "internal: the shim's status pipe")
flags.DEFINE_integer("lock_fd", -1, "internal: the container's lock, held by the shim until create is over")
FLAGS = flags.FLAGS
# The shim's log and one rotated predecessor: hours of a chatty container's warnings, bounded.
SHIM_LOG_MAX_BYTES = 1 << 20
# Set by a warm worker (runtime/warm/server.py): makes the anchor that stands for a shim forked
# from the worker, which is not the create command's child. None: the shim is (cold path).
SHIM_ANCHOR: Callable[[], "Anchor"] | None = None


def _version(args: Sequence[str]) -> int:
    print(f"kata-runtime  : {RUNTIME_VERSION}")
    return 0


def _runc_version() -> int:
    """runc's three lines, which containerd's go-runc parses ("version ", then "key: value")."""
    print(f"kata-runtime version {RUNTIME_VERSION}\ncommit: kata-vmfactory\nspec: {SPEC_VERSION}")
    return 0


def _features(args: Sequence[str]) -> int:
    from runtime.features import features

    print(json.dumps(features(), indent=4))
    return 0


def _env(args: Sequence[str]) -> int:
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
    from runtime.errors import KataRuntimeError

    if not args or len(args) > 1 + extra:
        raise KataRuntimeError(f"{command} takes a container ID" + (" and optional arguments" if extra else "")
                               + f", got {list(args)}")
    return args[0]


def _no_extra_fds() -> None:
    from runtime.errors import KataRuntimeError

    if FLAGS.preserve_fds:
        raise KataRuntimeError(f"--preserve-fds {FLAGS.preserve_fds}: passing extra fds into a VM is not "
                               "supported; leave it out")


def _fork_shim(container_id: str, bundle: str, status_fd: int, lock_fd: int, console_socket: str) -> int:
    """Starts the container's shim as a fork of this command, whose interpreter and imports are
    ready: no second cold interpreter on the way to the container's first output. The child
    keeps only stdio, the status pipe and the lock (a --log file is containerd's, not its).
    Run warm, the shim also keeps its anchor, the container's host process in its stead."""
    config_path = os.path.abspath(FLAGS.config) if FLAGS.config else None
    anchor = SHIM_ANCHOR() if SHIM_ANCHOR else None
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        if anchor:
            anchor.sock.close()
        return pid
    code = 1
    try:
        os.setsid()
        os.chdir("/")  # holds no mount busy
        _RUNTIME_LOG.handlers[:] = [std_logging.NullHandler()]
        std_logging.getLogger().handlers[:] = []
        _close_fds_except({0, 1, 2, status_fd, lock_fd} | ({anchor.sock.fileno()} if anchor else set()))
        if anchor:
            anchor.introduce()
        if console_socket:
            # A terminal's output goes to the engine's pty, not to our stdio. go-runc captures a
            # terminal create's stdio in a pipe and waits for its end: holding it, the shim
            # would keep create from ever finishing.
            from hostos import process as host_process

            host_process.stdio_to_devnull()
        code = _serve_container(config_path, container_id, bundle, status_fd, lock_fd, console_socket, anchor)
    except BaseException as err:  # its creator reads the status pipe: say why there
        try:
            os.write(status_fd, (json.dumps({"error": f"the shim failed: {err!r}"}) + "\n").encode())
        except OSError:
            pass
    finally:
        if anchor:
            anchor.exited(code)
        os._exit(code)


def _close_fds_except(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the directory's own fd, already gone


def _debug_stream():
    return sys.stderr if FLAGS.debug else None


def _lifecycle(command: str):
    def run_command(args: Sequence[str]) -> int:
        from runtime.sandbox import commands as c
        store = _store()
        if command == "create":
            _no_extra_fds()
            return c.create(store, _fork_shim, _one_id(args, command), _bundle(), FLAGS.pid_file, _debug_stream(),
                            console_socket=FLAGS.console_socket or "")
        if command == "run":
            return c.run(store, _fork_shim, _one_id(args, command), _bundle(), _debug_stream())
        if command == "start":
            return c.start(store, _one_id(args, command))
        if command == "state":
            return c.state_json(store, _one_id(args, command), sys.stdout)
        if command == "wait":
            return c.wait(store, _one_id(args, command))
        if command == "kill":
            return c.kill(store, _one_id(args, command, 1), *args[1:2], every_process=FLAGS.all)
        if command == "delete":
            return c.delete(store, _one_id(args, command), FLAGS.force)
        if command == "exec":
            _no_extra_fds()
            return c.exec_process(store, args[0] if args else "", args[1:], process_file=FLAGS.process,
                                  detach=FLAGS.detach, pid_file=FLAGS.pid_file,
                                  console_socket=FLAGS.console_socket or "", tty=FLAGS.tty, cwd=FLAGS.cwd,
                                  env=FLAGS.env)
        if command == "ps":
            return c.ps(store, _one_id(args, command, 16), FLAGS.format == "json", args[1:], sys.stdout)
        if command in ("pause", "resume"):
            return c.pause_or_resume(store, _one_id(args, command), command)
        if command == "update":
            return c.update(store, _one_id(args, command), FLAGS.resources)
        if command == "list":
            return c.list_containers(store, sys.stdout, FLAGS.format == "json")
        if command == "spec":
            return c.write_spec(_bundle())
        raise AssertionError(command)
    return run_command


def _shim(args: Sequence[str]) -> int:
    """The shim as a command of its own (`kata-runtime shim --status-fd N --lock-fd M ID BUNDLE`),
    for debugging it; `create` forks it instead (_fork_shim)."""
    container_id, bundle = args
    return _serve_container(FLAGS.config, container_id, bundle, FLAGS.status_fd, FLAGS.lock_fd,
                            FLAGS.console_socket or "")


def _serve_container(config_path: str | None, container_id: str, bundle: str, status_fd: int, lock_fd: int,
                     console_socket: str, anchor: "Anchor | None" = None) -> int:
    """The shim's life: create the container, serve it, return its exit status."""
    import asyncio
    from logging.handlers import RotatingFileHandler

    from configuration import loader
    from factory import tracing
    from runtime.sandbox.shim import run_shim

    store = _store()
    config = loader.load(config_path)
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
    return asyncio.run(run_shim(store, config, container_id, bundle, status_fd, lock_fd,
                                console_socket=console_socket, anchor=anchor))


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "check": _check,
    "create": _lifecycle("create"),
    "delete": _lifecycle("delete"),
    "exec": _lifecycle("exec"),
    "features": _features,
    "kill": _lifecycle("kill"),
    "list": _lifecycle("list"),
    "pause": _lifecycle("pause"),
    "ps": _lifecycle("ps"),
    "resume": _lifecycle("resume"),
    "run": _lifecycle("run"),
    "shim": _shim,
    "spec": _lifecycle("spec"),
    "start": _lifecycle("start"),
    "state": _lifecycle("state"),
    "env": _env,
    "factory": _factory,
    "update": _lifecycle("update"),
    "version": _version,
    "wait": _lifecycle("wait"),
}


# The commands' own messages for the --log file (runtime_log); never printed twice on stderr.
_RUNTIME_LOG = std_logging.getLogger("kata-runtime")
_RUNTIME_LOG.propagate = False
_RUNTIME_LOG.addHandler(std_logging.NullHandler())


def _open_log() -> None:
    """--log FILE: the commands' errors and warnings, and the libraries' log records, go there in
    --log-format (runc opens it the same way: created if missing, appended to)."""
    if not FLAGS.log:
        return
    from runtime.runtime_log import RuntimeLogHandler

    handler = RuntimeLogHandler(open(FLAGS.log, "a", buffering=1), FLAGS.log_format)
    level = std_logging.DEBUG if FLAGS.debug else std_logging.INFO
    _RUNTIME_LOG.addHandler(handler)
    _RUNTIME_LOG.setLevel(level)
    root_logger = std_logging.getLogger()
    root_logger.handlers[:] = [handler]
    root_logger.setLevel(level)


def fail(message: str) -> int:
    """An error, as runc reports one: on stderr, and as an "error" line in the --log file (the line
    containerd shows as the reason a command failed)."""
    print(f"kata-runtime: {message}", file=sys.stderr)
    _RUNTIME_LOG.error("%s", message)
    return 1


def main(argv: Sequence[str]) -> int:
    try:
        _open_log()
    except OSError as err:
        print(f"kata-runtime: cannot open --log {FLAGS.log}: {err.strerror}", file=sys.stderr)
        return 1
    if len(argv) < 2:
        if FLAGS.version:
            return _runc_version()
        return fail("missing COMMAND; one of: " + ", ".join(sorted(c for c in COMMANDS if c != "shim")))
    command, *args = argv[1:]
    if command not in COMMANDS:
        return fail(f"unknown command {command!r}; one of: " + ", ".join(sorted(c for c in COMMANDS if c != "shim")))
    from factory.errors import FactoryError
    from runtime.errors import KataRuntimeError

    try:
        return COMMANDS[command](args)
    except (FactoryError, KataRuntimeError) as err:
        return fail(str(err))
    except OSError as err:
        # Whatever the host refused (a path, a permission, a mount) is still one line, not a traceback.
        return fail(f"{command}: {err}")


def run() -> None:
    """absl's flags without absl.app: its start-up (absl.logging, pdb, its logging handler) was
    ~40 ms of every command here, and every command is a fresh process (containerd runs one per
    operation)."""
    faulthandler.enable()  # a crash still shows where, as under absl.app
    argv = _parse_flags(sys.argv)
    if FLAGS.help:
        print(__doc__.strip() + "\n\nFlags:\n" + FLAGS.module_help(__name__))
        sys.exit(0)
    sys.exit(main(argv))


def _parse_flags(argv: list[str]) -> list[str]:
    # Global flags come before the command, as runc's callers put them; any flag may also follow
    # the command and its ID (`run ID --bundle DIR`).
    try:
        rest = FLAGS(_underscored(argv), known_only=False)
    except flags.Error as err:
        name = getattr(err, "flagname", "")
        what = f"unknown flag --{name.replace('_', '-')}" if isinstance(err, flags.UnrecognizedFlagError) else str(err)
        print(f"kata-runtime: {what}; `kata-runtime --help` lists the flags", file=sys.stderr)
        sys.exit(1)
    # The shim runs in "/": a relative root must name the directory the user meant, from where
    # they ran the command (under `bazel run`, BUILD_WORKING_DIRECTORY).
    FLAGS.root = os.path.join(os.environ.get("BUILD_WORKING_DIRECTORY") or os.getcwd(), FLAGS.root)
    return rest


# Commands whose arguments after the container ID are someone else's: the process's command line
# (`exec ID CMD ARGS`), the host ps's options (`ps ID -ef`, as containerd's Top runs it).
_ARGS_AFTER_ID = ("exec", "ps")


def _underscored(argv: list[str]) -> list[str]:
    """runc spells flags with dashes (--pid-file); absl knows them with underscores (--pid_file).
    Nothing after "--" is touched: that is a process's command line (exec ID -- CMD ARGS), and
    runc's `exec ID CMD ARGS` (and `ps ID PS-OPTIONS`) get their "--" here, so that those flags
    stay their owner's."""
    out: list[str] = []
    positionals = 0
    takes_value = False
    for index, arg in enumerate(argv):
        if arg == "--":
            return out + argv[index:]
        if index == 0 or takes_value:
            out.append(arg)
            takes_value = False
            continue
        if arg == "-v":
            arg = "--version"
        if arg.startswith("-") and arg != "-":
            name, sep, value = arg.lstrip("-").partition("=")
            name = name.replace("-", "_")
            if arg.startswith("--"):
                arg = "--" + name + sep + value
            flag = FLAGS[name] if name in FLAGS else None
            takes_value = bool(flag is not None and not flag.boolean and not sep)
            out.append(arg)
            continue
        positionals += 1
        out.append(arg)
        if positionals == 2 and out[_command_index(out)] in _ARGS_AFTER_ID and index + 1 < len(argv):
            return out + ["--"] + argv[index + 1:] if argv[index + 1] != "--" else out + argv[index + 1:]
    return out


def _command_index(argv: list[str]) -> int:
    """Where the command is in an argv whose flag values are known to follow their flags."""
    index = 1
    while index < len(argv):
        arg = argv[index]
        if arg.startswith("-") and arg != "-":
            name, sep, _ = arg.lstrip("-").partition("=")
            flag = FLAGS[name] if name in FLAGS else None
            index += 2 if flag is not None and not flag.boolean and not sep else 1
            continue
        return index
    return index


if __name__ == "__main__":
    run()
