"""VMCache server: keeps cached VMs ready and hands them out over gRPC.

Usage: server [--config PATH]

Serves upstream Kata's cache.CacheService (Config, GetBaseVM, Status, Quit)
on the Unix socket factory.vm_cache_endpoint, keeping factory.vm_cache_number
paused VMs ready (template clones when factory.enable_template is set).
Runs in the foreground; SIGTERM, SIGINT or a Quit RPC stop it, stopping the
cached VMs, removing the template it created and the socket.
The configuration is --config, else $KATA_CONF_FILE, else the default
locations, else the built-in configuration.toml.
"""
import asyncio
import sys
from typing import Sequence

from absl import app, flags

from configuration import loader
from factory.errors import FactoryError
from vmcache.server import serve

flags.DEFINE_string("config", None, "configuration.toml to use")
FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        config = loader.load(FLAGS.config)
        asyncio.run(serve(config))
    except FactoryError as err:
        print(f"vmcache: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        # Whatever the host refused (a path, a permission, a port) is one line, not a traceback.
        print(f"vmcache: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    app.run(main)
