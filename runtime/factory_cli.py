"""kata-runtime factory init|status|destroy|gc, with upstream's output lines."""
from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Sequence, TextIO

import grpc
from google.protobuf import empty_pb2, json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from configuration import loader
from configuration.loader import RuntimeConfig
from factory import reaper
from factory.errors import FactoryError, TemplateError
from factory.ownership import OwnerKind
from factory.template import TemplateFactory
from hostos import sockets
from protocols.cache import cache_pb2_grpc
from protocols.pool import pool_pb2_grpc
from runtime import programs

# How long destroy waits for the server to stop its VMs and remove its socket.
DESTROY_WAIT_S = 30.0
RPC_TIMEOUT_S = 5.0

USAGE = """usage: kata-runtime factory COMMAND

manage vm factory

commands:
  init      initialize a VM factory based on kata-runtime configuration
  destroy   destroy the VM factory (also with no server alive: orphaned pool VMs, template, stale socket)
  gc        stop and remove VMs whose owner (VMCache server, shim, template builder) is dead
  status    query the status of VM factory (--json: as JSON, with template metadata and pool errors)"""


def _stub(endpoint: str) -> tuple[grpc.Channel, cache_pb2_grpc.CacheServiceStub]:
    channel = grpc.insecure_channel(f"unix://{endpoint}")
    return channel, cache_pb2_grpc.CacheServiceStub(channel)


def init(config: RuntimeConfig, out: TextIO) -> int:
    if config.vm_cache_number > 0:
        # Upstream's `factory init` runs the VMCache server in the foreground: this process becomes it.
        server = programs.vmcache_server()
        argv = [server] if config.path == loader.EMBEDDED else [server, "--config", config.path]
        os.execv(server, argv)
    if config.enable_template:
        # Idempotent: a template that is there and fits is kept.
        asyncio.run(TemplateFactory.open_or_create(config.vm_config, config.template_path, config.vm_run_root,
                                                   persist_path=config.template_persist_path))
        print("vm factory initialized", file=out)
        return 0
    print("vm factory or VMCache is not enabled", file=out)
    return 0


def destroy(config: RuntimeConfig, out: TextIO) -> int:
    """Works whether or not the server is alive: what a killed server left is cleaned up too."""
    if config.vm_cache_number > 0:
        endpoint = config.vm_cache_endpoint
        if _server_listening(endpoint):
            _quit_server(endpoint)
        elif sockets.remove_stale(endpoint):
            print(f"removed the stale VMCache socket {endpoint} (no server listens on it)", file=out)
    # A server killed with SIGKILL stopped nothing: its pool and template
    # boot VMs are orphans now (owner dead), never a live owner's VMs.
    for reaped in reaper.reap(config.vm_run_root, (OwnerKind.POOL, OwnerKind.TEMPLATE)):
        print(reaped.describe(), file=out)
    if config.enable_template:
        asyncio.run(TemplateFactory.destroy(config.vm_config, config.template_path))
    print("vm factory destroyed", file=out)
    return 0


def gc(config: RuntimeConfig, out: TextIO) -> int:
    """Reaps every VM whose owner (pool, shim, template builder, process) is dead."""
    if config.vm_cache_number > 0 and sockets.remove_stale(config.vm_cache_endpoint):
        print(f"removed the stale VMCache socket {config.vm_cache_endpoint}", file=out)
    reaped = reaper.reap(config.vm_run_root)
    for r in reaped:
        print(r.describe(), file=out)
    print(f"{len(reaped)} orphaned VM(s) reaped in {config.vm_run_root}", file=out)
    return 0


def _server_listening(endpoint: str) -> bool:
    try:
        return sockets.is_listening(endpoint)
    except OSError as err:
        raise FactoryError(f"cannot tell whether a VMCache server listens on {endpoint}: {err}") from err


def _quit_server(endpoint: str) -> None:
    channel, stub = _stub(endpoint)
    with channel:
        try:
            stub.Quit(empty_pb2.Empty(), timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as err:
            raise FactoryError(f"failed to call gRPC Quit: {err.details() or err.code().name}") from err
    # Upstream sleeps a second; waiting for the socket to go means the
    # server has stopped its VMs and removed its template too.
    deadline = time.monotonic() + DESTROY_WAIT_S
    while os.path.exists(endpoint) and time.monotonic() < deadline:
        time.sleep(0.05)
    if os.path.exists(endpoint):
        raise FactoryError(f"VMCache server at {endpoint} did not stop within {DESTROY_WAIT_S:.0f} s")


def status(config: RuntimeConfig, out: TextIO, as_json: bool = False) -> int:
    facts: dict = {"config": config.path}
    if config.vm_cache_number > 0:
        endpoint = config.vm_cache_endpoint
        channel, stub = _stub(endpoint)
        with channel:
            try:
                reply = stub.Status(empty_pb2.Empty(), timeout=RPC_TIMEOUT_S)
                facts["vm_cache"] = {"endpoint": endpoint, "server_pid": reply.pid,
                                     "vms": [{"pid": v.pid, "cpu": v.cpu, "memory_mib": v.memory}
                                             for v in reply.vmstatus]}
                if as_json:
                    facts["vm_cache"].update(_pool_details(channel))
                else:
                    print(f"VM cache server pid = {reply.pid}", file=out)
                    for v in reply.vmstatus:
                        print(f"VM pid = {v.pid} Cpu = {v.cpu} Memory = {v.memory}MiB", file=out)
            except grpc.RpcError as err:
                detail = err.details() or err.code().name
                facts["vm_cache"] = {"endpoint": endpoint, "error": detail}
                if not as_json:
                    if err.code() == grpc.StatusCode.UNAVAILABLE:
                        print(f'failed to connect "{endpoint}": {detail}', file=out)
                    else:
                        print(f"failed to call gRPC Status\n: {detail}", file=out)
    if config.enable_template:
        try:
            template = TemplateFactory.fetch(config.vm_config, config.template_path, config.vm_run_root)
            facts["template"] = {"on": True, **template.details()}
            line = "vm factory is on"
        except TemplateError as err:
            facts["template"] = {"on": False, "path": config.template_path, "error": str(err)}
            line = "vm factory is off"
    else:
        facts["template"] = {"on": False, "enabled": False}
        line = "vm factory not enabled"
    if as_json:
        print(json.dumps(facts, indent=2, sort_keys=True), file=out)
    else:
        print(line, file=out)
    return 0


def _pool_details(channel: grpc.Channel) -> dict:
    """The server's health and pool.PoolService status; an older server may have neither."""
    details: dict = {}
    try:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S)
        details["health"] = health_pb2.HealthCheckResponse.ServingStatus.Name(check.status)
    except grpc.RpcError as err:
        details["health"] = f"unknown: {err.details() or err.code().name}"
    try:
        pool = pool_pb2_grpc.PoolServiceStub(channel).Status(empty_pb2.Empty(), timeout=RPC_TIMEOUT_S)
        details["pool"] = json_format.MessageToDict(pool, preserving_proto_field_name=True,
                                                    always_print_fields_with_no_presence=True,
                                                    unquote_int64_if_possible=True)
    except grpc.RpcError as err:
        details["pool"] = {"error": err.details() or err.code().name}
    return details


def run(config: RuntimeConfig, args: Sequence[str], out: TextIO, as_json: bool) -> int:
    if not args or args[0] in ("help", "-h", "--help"):
        print(USAGE, file=out)
        return 0
    command, rest = args[0], args[1:]
    if rest:
        raise FactoryError(f"factory {command}: unexpected arguments {' '.join(rest)}")
    if command == "init":
        return init(config, out)
    if command == "destroy":
        return destroy(config, out)
    if command == "gc":
        return gc(config, out)
    if command == "status":
        return status(config, out, as_json)
    raise FactoryError(f"unknown factory command {command!r}; one of init, destroy, gc, status")
