"""Prometheus metrics of the VMCache server, served on factory.vm_cache_metrics_address.

Upstream has nothing beyond `factory status`. The metrics live in a registry
of their own (not prometheus_client's global one), so two servers in one
test process never share counters; the HTTP endpoint runs in
prometheus_client's own thread and only reads values.
"""
from __future__ import annotations

import errno
import time
from typing import Callable
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from factory.errors import ConfigError, FactoryError

PREFIX = "kata_vmcache"
# GetBaseVM hands out a parked VM in about a millisecond; seconds mean a
# caller waited for a VM to be built.
GET_BASE_VM_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0, 120.0)
# A clone is ready in ~0.1-0.5 s, a direct TCG boot in several seconds.
VM_BUILD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)


def failure_reason(err: BaseException) -> str:
    """A bounded label value: the factory's error class, else "other" (never the message)."""
    return type(err).__name__ if isinstance(err, FactoryError) else "other"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.pool_size = Gauge(f"{PREFIX}_pool_size", "VMs the pool keeps ready (factory.vm_cache_number).",
                               registry=r)
        self.pool_ready = Gauge(f"{PREFIX}_pool_ready_vms", "VMs ready in the pool now.", registry=r)
        self.handed_out = Counter(f"{PREFIX}_vms_handed_out", "VMs handed out by GetBaseVM.", registry=r)
        self.get_base_vm = Histogram(f"{PREFIX}_get_base_vm_duration_seconds",
                                     "Time GetBaseVM took to produce a VM, waits for a build included.",
                                     buckets=GET_BASE_VM_BUCKETS, registry=r)
        self.vm_build = Histogram(f"{PREFIX}_vm_build_duration_seconds",
                                  "Time to build one pool VM (clone or boot, warm-up, park).",
                                  buckets=VM_BUILD_BUCKETS, registry=r)
        self.vm_build_failures = Counter(f"{PREFIX}_vm_build_failures", "Pool VM builds that failed, by reason.",
                                         ["reason"], registry=r)
        self.template_creation = Gauge(f"{PREFIX}_template_creation_duration_seconds",
                                       "Time this server took to get its template, by source (boot or disk).",
                                       ["source"], registry=r)
        self.orphans_reaped = Counter(f"{PREFIX}_orphans_reaped", "VMs left by dead owners that this server stopped.",
                                      registry=r)
        self.start_time = Gauge(f"{PREFIX}_start_time_seconds", "Server start, seconds since the Unix epoch.",
                                registry=r)
        self.started_at = time.time()
        self.start_time.set(self.started_at)
        self._http: WSGIServer | None = None

    def serve(self, host: str, port: int) -> None:
        """Starts the /metrics HTTP endpoint.

        :raise ConfigError: the address is taken or cannot be bound.
        """
        address = f"{host}:{port}"
        try:
            self._http, _ = prometheus_client.start_http_server(port, addr=host, registry=self.registry)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ConfigError(f"metrics address {address} is already in use; set factory.vm_cache_metrics_address "
                                  "to a free port, or to \"\" to turn metrics off") from err
            raise ConfigError(f"cannot serve metrics on {address}: {err.strerror or err}; fix "
                              "factory.vm_cache_metrics_address") from err

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        return self._http.server_port if self._http else 0

    def watch_ready(self, count: Callable[[], int]) -> None:
        """Reads the ready count at scrape time, so it can never drift from the pool."""
        self.pool_ready.set_function(count)

    def close(self) -> None:
        if self._http:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
