"""The VMCache server: a cache of ready VMs served as cache.CacheService on a Unix socket.

`bazel run //vmcache:server` and `kata-runtime factory init` (with
vm_cache_number > 0) both run serve() in the foreground.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from typing import TextIO

import grpc

from configuration.loader import RuntimeConfig
from factory import reaper, tracing
from factory.errors import ConfigError
from factory.factory import Mode, new_factory
from factory.vm import VM
from hostos import safetree
from vmcache import endpoint, peergate
from vmcache.operations import Operations
from vmcache.service import CacheService, PreparedReplies

# In-flight calls get this long to finish when the server stops.
STOP_GRACE_S = 2.0

log = logging.getLogger(__name__)


async def serve(config: RuntimeConfig, progress: TextIO = sys.stderr) -> None:
    """Serves until SIGTERM/SIGINT or a Quit call; only peers running as root, as the server's own
    user or as one of factory.vm_cache_client_uids are served (checked by SO_PEERCRED)."""
    allowed_uids = frozenset({0, os.geteuid(), *config.vm_cache_client_uids})
    if config.vm_cache_number <= 0:
        raise ConfigError(f"{config.path}: factory.vm_cache_number is {config.vm_cache_number}, so VMCache is "
                          "disabled; set it to the number of VMs to keep ready")
    if config.tracing.enabled:
        tracing.setup(config.tracing.exporter, "kata-vmcache", config.tracing.otlp_endpoint)
    path = config.vm_cache_endpoint
    endpoint.claim(path)
    ops = Operations(config)  # before the template: a taken metrics port fails fast
    # A predecessor killed without cleaning up left its pool (and perhaps a
    # template boot) running: those owners are dead, so stop their VMs now.
    reaped_vms = await asyncio.to_thread(reaper.reap, config.vm_run_root)
    for reaped in reaped_vms:
        print(f"vmcache: {reaped.describe()}", file=progress, flush=True)
    ops.orphans_reaped(len(reaped_vms))
    started = time.monotonic()
    ready = 0
    replies = PreparedReplies()

    def on_ready(slot: int, vm: VM, seconds: float) -> None:
        nonlocal ready
        ready += 1
        replies.prepare(vm)
        ops.vm_built(slot, vm, seconds)
        print(f"vmcache: VM {vm.id} ready in {seconds:.2f} s (slot {slot}, pid {vm.hypervisor.state.pid}, "
              f"{ready} made since start, {time.monotonic() - started:.1f} s)", file=progress, flush=True)

    what = "template clones" if config.enable_template else "directly booted VMs"
    print(f"vmcache: preparing {config.vm_cache_number} {what}"
          + (f" (template in {config.template_path}: reused if it fits, else made)" if config.enable_template else ""),
          file=progress, flush=True)
    # Signals count from the start: a SIGTERM while the template is being
    # made must still stop its QEMU and unmount it.
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    making = asyncio.ensure_future(new_factory(config.factory_config(Mode.VMCACHE_POOL),
                                               on_ready=on_ready, on_failure=ops.vm_build_failed))
    stop_wait = asyncio.ensure_future(stopping.wait())
    await asyncio.wait({making, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    if not making.done():
        making.cancel()  # the template's own cleanup runs on cancellation
        await asyncio.gather(making, return_exceptions=True)
        print("vmcache: stopped before the pool was ready", file=progress, flush=True)
        await ops.close()
        return
    stop_wait.cancel()
    if making.exception():
        await ops.close()
    factory = making.result()
    ops.attach(factory)
    print(f"vmcache: {ops.template_summary()}", file=progress, flush=True)
    server = grpc.aio.server()
    # gRPC listens only in a private directory; the endpoint is the gate that checks peers. A fixed
    # name beside the endpoint, so a killed server's is replaced (claim() said nobody serves).
    inner_dir = path + ".grpc"
    safetree.remove_tree(inner_dir)
    os.mkdir(inner_dir, 0o700)
    gate = peergate.PeerGate(path, os.path.join(inner_dir, "grpc.sock"), allowed_uids)
    try:
        server.add_generic_rpc_handlers([CacheService(factory, stopping.set, ops.vm_handed_out, replies).handler()])
        ops.add_services(server)
        server.add_insecure_port(f"unix:{gate.inner_path}")
        await server.start()
        await gate.start()
        print(f"vmcache: VM cache server start, endpoint {path}", file=progress, flush=True)
        await stopping.wait()
    finally:
        await ops.close()
        await gate.stop()
        await server.stop(STOP_GRACE_S)
        await factory.close()
        endpoint.release(path)
        safetree.remove_tree(inner_dir)
        print("vmcache: VM cache server stop", file=progress, flush=True)
