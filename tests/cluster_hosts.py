"""Sidecar child processes in multi-host mode, and what tests ask of them."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from conftest import BASIC_TOKEN, Process, signed_headers
from nats_cluster import NatsCluster
from sidecar.settings import Settings

PRODUCT = "mymodule"
# The stream every host of a group shares, under its default name.
STREAM = Settings.model_fields["nats_stream"].default

# Every column of what a host stores about deliveries: hosts must agree on all.
TABLES = {
    "deliveries": "SELECT * FROM deliveries ORDER BY delivery_id",
    "entitlements": "SELECT * FROM entitlements ORDER BY shop_id, product",
    "customers": "SELECT * FROM customers ORDER BY shop_id",
    "stream_position": "SELECT * FROM stream_position",
}


@dataclass
class Host:
    """One sidecar of the group, as a child process."""

    name: str
    process: Process
    session: aiohttp.ClientSession

    @property
    def db(self) -> Path:
        return self.process.db

    async def post(
        self,
        body: dict[str, Any] | bytes,
        delivery_id: str,
        path: str = "/webhooks",
        basic: bool = False,
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Send a signed (or basic-auth) delivery; return status, JSON, headers."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        if basic:
            headers = {"webhook-id": delivery_id, **basic_auth()}
        else:
            headers = signed_headers(raw, delivery_id=delivery_id)
        async with self.session.post(
            self.process.webhook_url + path, data=raw, headers=headers
        ) as response:
            answer = await response.json(content_type=None)
            return response.status, answer, dict(response.headers)

    async def get(self, path: str) -> tuple[int, dict[str, Any]]:
        async with self.session.get(self.process.lookup_url + path) as response:
            return response.status, await response.json(content_type=None)

    async def metric(self, name: str) -> float:
        async with self.session.get(self.process.lookup_url + "/metrics") as response:
            text = await response.text()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} is not in /metrics")

    async def wait_ready(self, timeout: float = 30) -> None:
        """Wait until /readyz says this host has caught up with the stream."""
        deadline = time.monotonic() + timeout
        while True:
            status, answer = await self.get("/readyz")
            if status == 200:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not ready: {answer}")
            await asyncio.sleep(0.05)

    def logs(self) -> str:
        lines: list[str] = getattr(self.process.proc, "stderr_lines", [])
        return "".join(self.process.startup_log + lines)

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            return conn.execute(sql, params).fetchall()

    def tables(self) -> dict[str, list[tuple[Any, ...]]]:
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            return {name: conn.execute(sql).fetchall() for name, sql in TABLES.items()}

    def applied_sequence(self) -> int:
        rows = self.query("SELECT sequence FROM stream_position")
        return int(rows[0][0]) if rows else 0


StartHost = Callable[..., Host]


@contextlib.asynccontextmanager
async def running_nats(directory: Path, size: int) -> AsyncIterator[NatsCluster]:
    """nats-server nodes in `directory`, stopped however the test ends."""
    cluster = NatsCluster(directory, size=size)
    try:
        await cluster.start()
        yield cluster
    finally:
        cluster.stop()


def basic_auth() -> dict[str, str]:
    token = base64.b64encode(BASIC_TOKEN.encode()).decode()
    return {"Authorization": "Basic " + token}


def host_env(nats_urls: str, name: str, replicas: int) -> dict[str, str]:
    """Settings for one host of a group sharing the stream."""
    return {
        "SIDECAR_NATS_URL": nats_urls,
        "SIDECAR_NATS_CONSUMER": name,
        "SIDECAR_NATS_REPLICAS": str(replicas),
        "SIDECAR_NATS_PUBLISH_TIMEOUT_SECONDS": "2",
        "SIDECAR_NATS_APPLY_WAIT_SECONDS": "5",
        "SIDECAR_BASIC_AUTH": BASIC_TOKEN,
    }


def start_host(
    spawn: Callable[..., Process],
    session: aiohttp.ClientSession,
    nats_urls: str,
    name: str,
    db: Path,
    replicas: int,
    env: dict[str, str] | None = None,
) -> Host:
    """Start one host with `spawn` (the sidecar_process fixture)."""
    process = spawn(env={**host_env(nats_urls, name, replicas), **(env or {})}, db=db)
    return Host(name, process, session)


async def wait_until(
    predicate: Callable[[], bool], what: str, timeout: float = 30
) -> None:
    """Wait for a condition that no event announces, such as a database row."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.05)
