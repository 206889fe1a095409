"""Lookup load: wrk for TCP throughput, small Python clients for the rest.

wrk is the fastest client here, so it measures throughput at 32 connections
over TCP. It cannot reach a unix socket, and its latency figures at a single
connection disagree with its own throughput (their mean is several times one
over the request rate), so two Python clients do the rest: a blocking one
that times every request on one connection (latency, and throughput at one
connection), and a keep-alive client on uvloop for many connections over a
unix socket. Each client is only ever compared with itself against the bare
aiohttp server.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import re
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import uvloop

from bench.processes import LOAD_CORE, pinned
from bench.shops import HOT_SHOPS, hot_shop_indexes, shop_id

LUA_SCRIPT = Path(__file__).resolve().with_name("lookup.lua")
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)
# Enough distinct requests that cycling through them looks random to SQLite.
_REQUEST_POOL = 65536


@dataclass(frozen=True)
class LoadResult:
    """Throughput and latency of one load run."""

    requests: int
    errors: int
    elapsed_s: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float


def run_wrk(
    address: str, connections: int, duration_s: float, workload: str, shops: int
) -> LoadResult:
    """Run wrk on the load core against HOST:PORT for `duration_s` seconds."""
    command = pinned(
        LOAD_CORE,
        [
            "wrk",
            "--threads=1",
            f"--connections={connections}",
            f"--duration={max(1, round(duration_s))}s",
            "--timeout=2s",
            f"--script={LUA_SCRIPT}",
            f"http://{address}",
            "--",
            workload,
            str(shops),
            str(HOT_SHOPS),
        ],
    )
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    for line in completed.stdout.splitlines():
        if line.startswith("BENCH "):
            figures = json.loads(line.removeprefix("BENCH "))
            break
    else:
        raise RuntimeError(f"wrk printed no figures:\n{completed.stdout}")
    elapsed_s = figures["duration_us"] / 1e6
    return LoadResult(
        requests=figures["requests"],
        errors=figures["errors"],
        elapsed_s=elapsed_s,
        requests_per_s=figures["requests"] / elapsed_s,
        p50_ms=figures["p50_us"] / 1000,
        p99_ms=figures["p99_us"] / 1000,
    )


def lookup_requests(
    workload: str, shops: int, host: str = "localhost", seed: int = 7
) -> list[bytes]:
    """Raw GET requests, with shops chosen as lookup.lua chooses them."""
    rng = random.Random(seed)
    hot = hot_shop_indexes(shops)
    if workload == "sweep":
        # Each shop twice in a row: the sidecar keeps an answer from the
        # second lookup of its shop on.
        indexes: Iterator[int] = (index for index in range(shops) for _ in range(2))
    elif workload == "hot":
        indexes = (rng.choice(hot) for _ in range(_REQUEST_POOL))
    else:
        indexes = (rng.randrange(shops) for _ in range(_REQUEST_POOL))
    return [
        f"GET /entitlement/{shop_id(index)} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        for index in indexes
    ]


def run_probe(address: str, duration_s: float, requests: list[bytes]) -> LoadResult:
    """Time every request, one at a time on one connection, for `duration_s`."""
    latencies_s = []
    errors = 0
    with _connect(address) as sock:
        started = time.perf_counter()
        stop_at = started + duration_s
        for request in itertools.cycle(requests):
            sent_at = time.perf_counter()
            if sent_at >= stop_at:
                break
            sock.sendall(request)
            status = _read_response(sock)
            latencies_s.append(time.perf_counter() - sent_at)
            errors += status != 200
        elapsed_s = time.perf_counter() - started
    return load_result(latencies_s, errors, elapsed_s)


def _connect(address: str) -> socket.socket:
    if address.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(address.removeprefix("unix:"))
    else:
        host, _, port = address.rpartition(":")
        sock = socket.create_connection((host.strip("[]"), int(port)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(5.0)
    return sock


def _read_response(sock: socket.socket) -> int:
    buffer = b""
    while (head_end := buffer.find(b"\r\n\r\n")) < 0:
        buffer += _recv(sock)
    match = _CONTENT_LENGTH.search(buffer, 0, head_end + 2)
    length = int(match.group(1)) if match else 0
    while len(buffer) < head_end + 4 + length:
        buffer += _recv(sock)
    return int(buffer[9:12])


def _recv(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionError("the server closed the connection mid-answer")
    return chunk


def run_connections(
    address: str,
    connections: int,
    duration_s: float,
    requests: Sequence[bytes],
    repeat: bool = True,
) -> LoadResult:
    """Keep `connections` keep-alive connections busy for `duration_s` seconds.

    With `repeat` false each request is sent once, and the run ends early
    when all have been answered.
    """
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(
            _many_connections(address, connections, duration_s, requests, repeat)
        )


class _Tally:
    def __init__(self) -> None:
        self.latencies_s: list[float] = []
        self.errors = 0


class _KeepAliveClient(asyncio.Protocol):
    """One connection that sends the next request as soon as an answer ends."""

    def __init__(
        self, requests: Iterator[bytes], stop_at: float, tally: _Tally
    ) -> None:
        self._requests = requests
        self._stop_at = stop_at
        self._tally = tally
        self._buffer = bytearray()
        self._sent_at = 0.0
        self._transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport, but have
        # all its methods.
        self._transport = cast(asyncio.Transport, transport)
        self._send_next()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        head_end = self._buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return
        match = _CONTENT_LENGTH.search(self._buffer, 0, head_end + 2)
        length = int(match.group(1)) if match else 0
        if len(self._buffer) < head_end + 4 + length:
            return

        self._tally.latencies_s.append(time.perf_counter() - self._sent_at)
        if self._buffer[9:12] != b"200":
            self._tally.errors += 1
        # One request is in flight at a time, so nothing follows this answer.
        self._buffer.clear()
        self._send_next()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def _send_next(self) -> None:
        assert self._transport is not None
        request = next(self._requests, None)
        if request is None or time.perf_counter() >= self._stop_at:
            self._transport.close()
            return
        self._sent_at = time.perf_counter()
        self._transport.write(request)


async def _many_connections(
    address: str,
    connections: int,
    duration_s: float,
    requests: Sequence[bytes],
    repeat: bool,
) -> LoadResult:
    loop = asyncio.get_running_loop()
    tally = _Tally()
    pool = itertools.cycle(requests) if repeat else iter(requests)
    started = time.perf_counter()
    stop_at = started + duration_s

    def client() -> _KeepAliveClient:
        return _KeepAliveClient(pool, stop_at, tally)

    clients = []
    for _ in range(connections):
        if address.startswith("unix:"):
            _, protocol = await loop.create_unix_connection(
                client, address.removeprefix("unix:")
            )
        else:
            host, _, port = address.rpartition(":")
            _, protocol = await loop.create_connection(client, host, int(port))
        clients.append(protocol)
    await asyncio.gather(*(protocol.closed for protocol in clients))
    return load_result(tally.latencies_s, tally.errors, time.perf_counter() - started)


def load_result(latencies_s: list[float], errors: int, elapsed_s: float) -> LoadResult:
    """Figures of a run from the latency of each request it made."""
    latencies = sorted(latencies_s)
    return LoadResult(
        requests=len(latencies),
        errors=errors,
        elapsed_s=elapsed_s,
        requests_per_s=len(latencies) / elapsed_s,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
    )


def percentile(sorted_values: Sequence[float], percent: float) -> float:
    """The nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = round(percent / 100 * (len(sorted_values) - 1))
    return sorted_values[rank]
