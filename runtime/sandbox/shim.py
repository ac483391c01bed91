"""The per-container shim: creates the sandbox VM and container, then owns them.

`kata-runtime create` starts it detached (own session), with the caller's
stdout and stderr, which receive the container's output, as runc's container
process would. It reports "created" or the error on a status pipe, then
serves start, kill, exec, wait and delete on its control socket. Its own log
goes to shim.log in the container's state directory, never to the
container's stdio.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

from opentelemetry.context import Context

from factory import tracing
from factory.config import VMConfig
from hostos import process as host_process
from factory.vm import VM
from runtime.config.loader import RuntimeConfig
from runtime.oci.spec import BundleSpec, ProcessSpec, load_bundle, parse_process
from runtime.sandbox import share, vm_source
from runtime.sandbox.state import ContainerState, StateStore, now_rfc3339

# Where the guest mounts the VM's 9p share; rootfs are below it, one per container.
GUEST_SHARED_DIR = "/run/kata-containers/shared"
SHARED_FS_TAG = "kataShared"

_TRACER = "kata_vmfactory.runtime"
log = logging.getLogger("kata-shim")


def sized_request(base: VMConfig, spec: BundleSpec) -> VMConfig:
    """The base VM config with the spec's CPU and memory asks (0 leaves the base size)."""
    hv = dataclasses.replace(base.hypervisor, num_vcpus=spec.vcpus or base.hypervisor.num_vcpus,
                             memory_mib=max(spec.memory_mib, base.hypervisor.memory_mib))
    return dataclasses.replace(base, hypervisor=hv)


class Shim:
    def __init__(self, store: StateStore, config: RuntimeConfig, container_id: str, bundle: str) -> None:
        self.store = store
        self.config = config
        self.id = container_id
        self.bundle = bundle
        self.state = ContainerState(id=container_id, bundle=bundle, status="creating", created=now_rfc3339(),
                                    shim_pid=os.getpid(),
                                    shim_start_time=host_process.start_time(os.getpid()) or 0)
        self.vm: VM | None = None
        self.exited = asyncio.Event()
        self.exec_streams: dict[str, asyncio.Queue] = {}
        self.done = asyncio.Event()

    # ---- create -------------------------------------------------------------

    async def create(self, ctx: Context | None) -> None:
        phases: dict[str, float] = {}
        started = time.monotonic()

        def phase(name: str) -> None:
            nonlocal started
            now = time.monotonic()
            phases[name] = round((now - started) * 1000, 1)
            started = now

        spec = load_bundle(self.bundle)
        self.state.annotations = dict(spec.annotations)
        self.store.save(self.state)
        factory, path, warnings = await vm_source.open_factory(self.config, ctx)
        for warning in warnings:
            log.warning("%s", warning)
        phase("factory")
        try:
            self.vm = await factory.get_vm(sized_request(self.config.vm_config, spec), ctx)
        finally:
            if path in ("vmcache", "direct"):
                await factory.close()  # a template stays for the next sandbox
        phase("get_vm")
        self.state.vm = self.vm.hypervisor.state.to_dict()
        rootfs_share = share.bind_rootfs(self.vm.hypervisor.run, self.id, spec.rootfs, spec.rootfs_readonly)
        self.state.share_mount, self.state.share_mount_id = rootfs_share.mount_point, rootfs_share.mount_id
        self.store.save(self.state)
        await self.vm.agent.mount_shared(SHARED_FS_TAG, GUEST_SHARED_DIR, ctx=ctx)
        pid = await self._create_process(self.id, spec.process, ctx, hostname=spec.hostname,
                                         readonly=spec.rootfs_readonly)
        phase("create_process")
        self.state.pid = pid
        self.state.status = "created"
        self.state.annotations.update({
            "io.katacontainers.factory.path": path,
            "io.katacontainers.factory.warnings": "; ".join(warnings),
            "io.katacontainers.vm.id": self.vm.id,
            "io.katacontainers.timing.ms": json.dumps(phases),
        })
        self.store.save(self.state)

    async def _create_process(self, exec_id: str, process: ProcessSpec, ctx: Context | None,
                              hostname: str = "", readonly: bool = False) -> int:
        return await self.vm.agent.create_process(
            exec_id=exec_id, args=process.args, env=process.env, cwd=process.cwd, uid=process.uid,
            gid=process.gid, additional_gids=process.additional_gids,
            rootfs=f"{GUEST_SHARED_DIR}/{share.guest_relative_rootfs(self.id)}", rootfs_readonly=readonly, hostname=hostname, ctx=ctx)

    # ---- serving ------------------------------------------------------------

    async def relay_events(self) -> None:
        """Guest events: the container's output to our stdio, exec output to its caller."""
        while True:
            event = await self.vm.agent.events.get()
            kind = event.WhichOneof("kind")
            if kind == "process_output":
                out = event.process_output
                if out.exec_id == self.id:
                    await asyncio.to_thread(_write_all, 1 if out.stream == 1 else 2, out.data)
                elif out.exec_id in self.exec_streams:
                    await self.exec_streams[out.exec_id].put({"out": out.stream, "data": base64.b64encode(out.data).decode()})
            elif kind == "process_exited":
                exited = event.process_exited
                if exited.exec_id == self.id:
                    self.state.status = "stopped"
                    self.state.exit_status = exited.exit_status
                    self.store.save(self.state)
                    self.exited.set()
                elif exited.exec_id in self.exec_streams:
                    await self.exec_streams[exited.exec_id].put({"exit_status": exited.exit_status})

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def send(message: dict[str, Any]) -> None:
            writer.write((json.dumps(message) + "\n").encode())

        try:
            request = json.loads(await reader.readline())
            op = request.get("op")
            if op == "start":
                if self.state.status != "created":
                    raise RuntimeError(f"container {self.id} is {self.state.status}, not created")
                await self.vm.agent.start_process(self.id)
                self.state.status = "running"
                self.store.save(self.state)
                send({"ok": True})
            elif op == "kill":
                if self.state.status == "stopped":
                    raise RuntimeError(f"container {self.id} is not running")
                await self.vm.agent.signal_process(self.id, int(request.get("signal", signal.SIGTERM)))
                send({"ok": True})
            elif op == "wait":
                send({"ok": True})
                await writer.drain()
                await self.exited.wait()
                send({"exit_status": self.state.exit_status})
            elif op == "exec":
                await self._exec(request, send, writer)
            elif op == "delete":
                await self.teardown()
                send({"ok": True})
                self.done.set()
            else:
                raise RuntimeError(f"unknown shim request {op!r}")
        except Exception as err:  # every failure goes back to the command that asked
            log.warning("request failed: %s", err)
            send({"error": str(err)})
        finally:
            try:
                await writer.drain()
                writer.close()
            except OSError:
                pass

    async def _exec(self, request: dict[str, Any], send, writer: asyncio.StreamWriter) -> None:
        if self.state.status != "running":
            raise RuntimeError(f"container {self.id} is {self.state.status}; exec needs a running container")
        exec_id = str(request["exec_id"])
        process = parse_process(request["process"], "exec")
        queue: asyncio.Queue = asyncio.Queue()
        self.exec_streams[exec_id] = queue
        try:
            await self._create_process(exec_id, process, None)
            await self.vm.agent.start_process(exec_id)
            send({"ok": True})
            while True:
                message = await queue.get()
                send(message)
                await writer.drain()
                if "exit_status" in message:
                    return
        finally:
            self.exec_streams.pop(exec_id, None)

    async def teardown(self) -> None:
        """Stops the VM, removes the rootfs bind mount and the VM's run directory."""
        share.unbind(self.state.share_mount, self.state.share_mount_id)
        if self.vm is not None:
            await self.vm.stop()

    async def serve(self, listening: Callable[[], None] = lambda: None) -> None:
        """Serves the control socket; `listening` runs once it accepts connections (create must
        not return before that, or an immediate start finds no socket)."""
        socket_path = str(self.store.shim_socket(self.id))
        server = await asyncio.start_unix_server(self.handle, path=socket_path)
        os.chmod(socket_path, 0o600)
        listening()
        relay = asyncio.ensure_future(self.relay_events())
        loop = asyncio.get_running_loop()
        # A shim told to stop by a signal still cleans up (delete --force is the other way).
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self._stop_by_signal()))
        try:
            async with server:
                await self.done.wait()
        finally:
            relay.cancel()
            await asyncio.gather(relay, return_exceptions=True)

    async def _stop_by_signal(self) -> None:
        await self.teardown()
        self.done.set()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BrokenPipeError:
            return  # the reader went away; the container keeps running


async def run_shim(store: StateStore, config: RuntimeConfig, container_id: str, bundle: str, status_fd: int) -> int:
    shim = Shim(store, config, container_id, bundle)
    with tracing.span(_TRACER, "CreateContainer", None, container_id=container_id) as ctx:
        try:
            await shim.create(ctx)
        except BaseException as err:
            log.error("create failed: %s", err)
            await shim.teardown()
            _report(status_fd, {"error": str(err)})
            return 1
    await shim.serve(listening=lambda: _report(status_fd, {"ok": True, "pid": shim.state.pid}))
    return 0


def _report(fd: int, message: dict[str, Any]) -> None:
    try:
        os.write(fd, (json.dumps(message) + "\n").encode())
        os.close(fd)
    except OSError:
        pass
