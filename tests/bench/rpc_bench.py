"""VMCache RPC: the server binary in its own process, clients over its Unix socket.

- Status round trip with 1, 8 and 32 concurrent clients (a channel each, one
  asyncio process: client-side queueing is part of the figure, as in any
  single-process load generator);
- the first call on a new channel (connect + HTTP/2 set-up) vs the next one;
- GetBaseVM for a VM that is already ready: before each call the pool is
  full (Status), so the figure is the hand-out, not a clone being made;
- GetBaseVM bursts of 8 and 32 clients at once on a pool of POOL: latency,
  errors, VMs handed out per second, then how fast the pool refills.

Every VM handed out is stopped by the benchmark (off the clock).

bazel run //tests/bench:rpc [-- --quick]
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
from google.protobuf import empty_pb2

from tests.bench import common, runner
from tests.bench.vmcache_server import VMCacheServer, get_base_vm_call, status_stub, stop_handed_out

POOL = 4
STATUS_CLIENTS = (1, 8, 32)
BURSTS = (8, 32)
STATUS_TIMEOUT_S = 5.0
GET_TIMEOUT_S = 150.0
REFILL_POLL_S = 0.005
# Stopping 32 VMs at once is fine; it is bounded anyway so it cannot swamp the cores.
STOP_CONCURRENCY = 8


def _channel(socket: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"unix://{socket}")


async def _status_load(socket: str, clients: int, calls_each: int) -> tuple[list[float], list[str]]:
    """Each client its own warm channel; all start together; per-call latency in ms."""
    channels = [_channel(socket) for _ in range(clients)]
    latencies: list[float] = []
    errors: list[str] = []
    try:
        stubs = [status_stub(c) for c in channels]
        await asyncio.gather(*(s.Status(empty_pb2.Empty(), timeout=STATUS_TIMEOUT_S) for s in stubs))  # connect
        go = asyncio.Event()

        async def client(stub) -> None:
            await go.wait()
            for _ in range(calls_each):
                start = time.perf_counter()
                try:
                    await stub.Status(empty_pb2.Empty(), timeout=STATUS_TIMEOUT_S)
                    latencies.append((time.perf_counter() - start) * 1000)
                except grpc.aio.AioRpcError as err:
                    errors.append(f"{err.code().name}: {err.details()}")

        tasks = [asyncio.ensure_future(client(s)) for s in stubs]
        go.set()
        await asyncio.gather(*tasks)
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    return latencies, errors


async def _first_vs_warm(socket: str, trials: int) -> tuple[list[float], list[float]]:
    first, warm = [], []
    for _ in range(trials):
        channel = _channel(socket)
        try:
            stub = status_stub(channel)
            start = time.perf_counter()
            await stub.Status(empty_pb2.Empty(), timeout=STATUS_TIMEOUT_S)
            first.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            await stub.Status(empty_pb2.Empty(), timeout=STATUS_TIMEOUT_S)
            warm.append((time.perf_counter() - start) * 1000)
        finally:
            await channel.close()
    return first, warm


async def _stop_all(raws: list[bytes]) -> None:
    gate = asyncio.Semaphore(STOP_CONCURRENCY)

    async def stop(raw: bytes) -> None:
        async with gate:
            await stop_handed_out(raw)

    pending, raws[:] = list(raws), []
    await asyncio.gather(*(stop(r) for r in pending), return_exceptions=True)


async def _burst(server: VMCacheServer, clients: int, handed: list[bytes]) -> dict[str, Any]:
    """`clients` GetBaseVM calls at once on a full pool; then the refill until full again."""
    await server.wait_full()
    channels = [_channel(server.socket) for _ in range(clients)]
    latencies: list[float] = []
    errors: list[str] = []
    try:
        await asyncio.gather(*(status_stub(c).Status(empty_pb2.Empty(), timeout=STATUS_TIMEOUT_S) for c in channels))
        go = asyncio.Event()

        async def client(channel) -> None:
            await go.wait()
            start = time.perf_counter()
            try:
                raw = await get_base_vm_call(channel)(empty_pb2.Empty(), timeout=GET_TIMEOUT_S)
                handed.append(raw)
                latencies.append((time.perf_counter() - start) * 1000)
            except grpc.aio.AioRpcError as err:
                errors.append(f"{err.code().name}: {err.details()}")

        tasks = [asyncio.ensure_future(client(c)) for c in channels]
        started = time.perf_counter()
        go.set()
        await asyncio.gather(*tasks)
        burst_s = time.perf_counter() - started
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    # Refill: from the burst's end until the pool is full again, noting each new ready VM.
    start = time.perf_counter()
    ready_at: list[float] = []
    last = 0
    while True:
        count = await server.ready_count()
        if count > last:
            ready_at += [time.perf_counter() - start] * (count - last)
            last = count
        if count >= server.pool or time.perf_counter() - start > GET_TIMEOUT_S:
            break
        await asyncio.sleep(REFILL_POLL_S)
    refill_s = time.perf_counter() - start
    await _stop_all(handed)
    return {"clients": clients, "latency_ms": latencies, "errors": errors, "burst_s": burst_s,
            "handed_per_s": len(latencies) / burst_s if burst_s else 0.0, "refill_s": refill_s,
            "refill_ready_at_s": ready_at, "refill_vms_per_s": server.pool / refill_s if refill_s else 0.0}


async def run(bench: runner.Bench, section: common.Section) -> None:
    status_total, trials, get_runs = (300, 20, 10) if bench.quick else (1000, 50, 30)
    server = VMCacheServer(bench.dir("rpc"), POOL, bench.initrd_path)
    data: dict[str, Any] = {"pool": POOL, "status": {}, "bursts": {}}
    section.data.update(data)
    handed: list[bytes] = []
    try:
        await server.start()
        data["server_start_s"] = await server.wait_full()
        for clients in STATUS_CLIENTS:
            latencies, errors = await _status_load(server.socket, clients, max(10, status_total // clients))
            data["status"][clients] = {"latency_ms": latencies, "errors": errors}
        common.log("rpc: Status done")
        data["first_call_ms"], data["warm_call_ms"] = await _first_vs_warm(server.socket, trials)

        channel = _channel(server.socket)
        try:
            call = get_base_vm_call(channel)
            await status_stub(channel).Status(empty_pb2.Empty(), timeout=STATUS_TIMEOUT_S)
            ready_ms: list[float] = []
            data["get_ready_ms"] = ready_ms
            for i in range(get_runs + 1):
                await server.wait_full()
                start = time.perf_counter()
                raw = await call(empty_pb2.Empty(), timeout=GET_TIMEOUT_S)
                elapsed = (time.perf_counter() - start) * 1000
                handed.append(raw)
                if i:  # the first is a warm-up
                    ready_ms.append(elapsed)
                await _stop_all(handed)
        finally:
            await channel.close()
        common.log(f"rpc: GetBaseVM (ready) p50 {common.fmt_ms(common.percentile(ready_ms, 50))}")
        for clients in BURSTS:
            data["bursts"][clients] = await _burst(server, clients, handed)
            common.log(f"rpc: burst of {clients} done")
    finally:
        await _stop_all(handed)
        await server.stop()
        section.data.update(data)
        _report(section, data)


def _row(label: str, values: list[float], errors: int | str = "") -> list[str]:
    s = common.summary(values)
    return [label, str(s["n"]), common.fmt_ms(s["p50"]), common.fmt_ms(s["p90"]), common.fmt_ms(s["p99"]),
            common.fmt_ms(s["max"]), str(errors)]


def _report(section: common.Section, data: dict[str, Any]) -> None:
    headers = ["call", "calls", "p50", "p90", "p99", "max", "errors"]
    rows = [_row(f"Status, {c} client{'s' if c > 1 else ''}", d["latency_ms"], len(d["errors"]))
            for c, d in data["status"].items()]
    if data.get("first_call_ms"):
        rows.append(_row("Status, first call on a new channel", data["first_call_ms"]))
        rows.append(_row("Status, second call (warm channel)", data["warm_call_ms"]))
    if data.get("get_ready_ms"):
        rows.append(_row("GetBaseVM, 1 client, VM ready (pool full)", data["get_ready_ms"], 0))
    for c, b in data["bursts"].items():
        rows.append(_row(f"GetBaseVM, burst of {c} clients (pool {data['pool']})", b["latency_ms"], len(b["errors"])))
    section.tables.append(common.Table(
        f"VMCache RPC round trips over the Unix socket (server: pool of {data['pool']} template clones)",
        headers, rows, "p99 of fewer than 100 calls is close to the max."))
    if data["bursts"]:
        section.tables.append(common.Table(
            "GetBaseVM bursts and pool refill",
            ["burst", "burst took", "VMs handed/s", "errors", "refill to full", "refill rate", "first ready after"],
            [[f"{c} clients", f"{b['burst_s']:.2f} s", f"{b['handed_per_s']:.1f}", str(len(b["errors"])),
              f"{b['refill_s']:.2f} s", f"{b['refill_vms_per_s']:.1f} VMs/s",
              common.fmt_ms(b["refill_ready_at_s"][0] * 1000) if b["refill_ready_at_s"] else "–"]
             for c, b in data["bursts"].items()],
            "A burst larger than the pool waits for clones made on demand; refill = from the burst's end "
            f"until Status shows {data['pool']} ready VMs again."))
        errors = sorted({e for b in data["bursts"].values() for e in b["errors"]})
        if errors:
            section.notes.append("burst errors: " + "; ".join(errors[:3]))

    ready = common.summary(data.get("get_ready_ms", []))
    got = ready["n"] > 0
    burst32 = data["bursts"].get(32)
    section.targets += [
        common.Target("GetBaseVM p50, 1 client", ready["p50"] if got else None, "<=", 1, " ms"),
        common.Target("GetBaseVM p99, 1 client", ready["p99"] if got else None, "<=", 3, " ms"),
        common.Target("GetBaseVM errors, 32 clients", len(burst32["errors"]) if burst32 else None, "<=", 0),
    ]
    section.panels.append(("VMCache RPC latency (p50 / p99) vs concurrent clients", lambda ax: _plot(ax, data)))


def _plot(ax, data: dict[str, Any]) -> None:
    status = {c: common.summary(d["latency_ms"]) for c, d in data["status"].items()}
    cs = sorted(status)
    ax.plot(cs, [status[c]["p50"] for c in cs], "o-", color="#37b", label="Status p50")
    ax.plot(cs, [status[c]["p99"] for c in cs], "o--", color="#37b", label="Status p99")
    points = {}
    if data.get("get_ready_ms"):
        points[1] = common.summary(data["get_ready_ms"])
    for c, b in data["bursts"].items():
        points[c] = common.summary(b["latency_ms"])
    if points:
        gs = sorted(points)
        ax.plot(gs, [points[c]["p50"] for c in gs], "s-", color="#b33", label="GetBaseVM p50")
        ax.plot(gs, [points[c]["p99"] for c in gs], "s--", color="#b33", label="GetBaseVM p99")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("ms")
    ax.legend(fontsize=8)


SPEC = runner.Spec("rpc", "3. VMCache RPC", run)

if __name__ == "__main__":
    runner.run("rpc", [SPEC])
