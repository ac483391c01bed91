"""kata-runtime: the VM-isolated container runtime's command line.

Usage: kata-runtime [flags] COMMAND [ARGS...]

Global flags: --config PATH (else $KATA_CONF_FILE, the default locations,
then the built-in configuration.toml).

Commands:
  factory init|status|destroy
            manage the VM factory: init creates the template or runs the
            VMCache server (in the foreground); status [--json]; destroy
  check     check that this host can run factory VMs (QEMU, migration capability,
            kernel, initramfs, accelerator, tmpfs, run root)
  env       show the guest kernel, initramfs, QEMU and the accelerator chosen (and why)
  version   print the runtime's version
"""
import sys
from typing import Callable, Sequence

from absl import app, flags

from runtime.version import RUNTIME_VERSION

flags.DEFINE_string("config", None, "configuration.toml to use")
flags.DEFINE_bool("json", False, "factory status: print JSON")
FLAGS = flags.FLAGS


def _version(args: Sequence[str]) -> int:
    print(f"kata-runtime  : {RUNTIME_VERSION}")
    return 0


def _env(args: Sequence[str]) -> int:
    import json
    import subprocess

    from factory import assets
    from factory.config import HypervisorConfig
    from factory.hypervisor import accelerator

    hv = HypervisorConfig().valid()
    kernel = assets.kernel_info()
    try:
        qemu_version = subprocess.run([hv.qemu_path, "--version"], capture_output=True, text=True,
                                      timeout=10).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired) as err:
        qemu_version = f"unavailable ({err})"
    accel = accelerator.choose(hv.accelerator, hv.qemu_path)
    print(json.dumps({
        "Runtime": {"Version": RUNTIME_VERSION},
        "Kernel": {"Path": hv.kernel_path, "Package": kernel.get("package", "not installed"),
                   "Version": kernel.get("version", ""), "Release": kernel.get("release", "")},
        "Initrd": {"Path": hv.initrd_path},
        "Hypervisor": {"Path": hv.qemu_path, "Version": qemu_version, "Machine": hv.machine,
                       "Accelerator": accel.name, "AcceleratorReason": accel.reason, "CPUModel": accel.cpu_model},
    }, indent=2))
    return 0


def _factory(args: Sequence[str]) -> int:
    from runtime import factory_cli
    from runtime.config import loader

    return factory_cli.run(loader.load(FLAGS.config), args, sys.stdout, FLAGS.json)


def _check(args: Sequence[str]) -> int:
    from runtime import check
    from runtime.config import loader

    return check.run(loader.load(FLAGS.config), sys.stdout)


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "check": _check,
    "env": _env,
    "factory": _factory,
    "version": _version,
}


def main(argv: Sequence[str]) -> int:
    if len(argv) < 2:
        raise app.UsageError("missing COMMAND; one of: " + ", ".join(sorted(COMMANDS)))
    command, *args = argv[1:]
    if command not in COMMANDS:
        raise app.UsageError(f"unknown command {command!r}; one of: " + ", ".join(sorted(COMMANDS)))
    from factory.errors import FactoryError

    try:
        return COMMANDS[command](args)
    except FactoryError as err:
        print(f"kata-runtime: {err}", file=sys.stderr)
        return 1


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
