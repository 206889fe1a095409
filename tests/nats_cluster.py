"""Real nats-server processes with JetStream on loopback ports, for tests.

`NatsCluster(tmp_path, size=3)` writes one config file per node into the test's
directory and starts a JetStream cluster; `size=1` is a single server. A node
keeps its ports and its store across kill and start, so a restarted node
rejoins, and sidecars keep their list of URLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nats.js import JetStreamContext
    from nats.js.api import StreamInfo

CLUSTER_NAME = "sidecar-test"


def require_nats(server_too: bool = True) -> str:
    """Return the nats-server path; skip without it or nats-py (fail under CI)."""
    missing = []
    server = shutil.which("nats-server")
    if server is None and server_too:
        missing.append("nats-server (apt-get install nats-server)")
    if importlib.util.find_spec("nats") is None:
        missing.append("nats-py (pip install -e '.[nats]')")
    if missing:
        import pytest

        reason = "multi-host tests need " + " and ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; .ci/run and scripts/test install both")
        pytest.skip(reason)
    return server or ""


# Ports handed out by this test run, so that no two nodes are given the same one.
_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A loopback port that nothing listens on, and the kernel will not lend out.

    A port the kernel picks for `bind(0)` comes from the ephemeral range, which
    is also where every outgoing connection gets its local port: between this
    call and nats-server's own bind, a route between two nodes or a client of a
    sidecar can take it. Ports below that range are only ever taken on purpose,
    so a free one there stays free.
    """
    low, high = _ephemeral_range()
    candidates = list(range(max(1024, low // 2), low)) or list(range(high + 1, 65536))
    random.shuffle(candidates)
    for port in candidates:
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free loopback port outside the ephemeral range")


@dataclass
class NatsNode:
    name: str
    directory: Path
    client_port: int = field(default_factory=free_port)
    cluster_port: int = field(default_factory=free_port)
    monitor_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def config(self) -> Path:
        return self.directory / f"{self.name}.conf"

    def start(self, server: str) -> None:
        log = open(self.directory / f"{self.name}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [server, "-c", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, no flush."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def monitor(self, path: str) -> dict[str, Any] | None:
        """Read a monitoring endpoint; None while the node does not answer."""
        url = f"http://127.0.0.1:{self.monitor_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                value: dict[str, Any] = json.load(response)
                return value
        except (OSError, urllib.error.URLError, ValueError):
            return None


class NatsCluster:
    """A JetStream cluster of `size` nodes (one node: a single server)."""

    def __init__(self, directory: Path, size: int = 3, authorization: str = "") -> None:
        self.server = require_nats()
        self.directory = directory / "nats"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.nodes = [NatsNode(f"n{i + 1}", self.directory) for i in range(size)]
        for node in self.nodes:
            node.config.write_text(self._config(node, authorization))

    @property
    def urls(self) -> str:
        """The value for SIDECAR_NATS_URL."""
        return ",".join(node.url for node in self.nodes)

    def _config(self, node: NatsNode, authorization: str) -> str:
        lines = [
            f"server_name: {node.name}",
            f"listen: 127.0.0.1:{node.client_port}",
            f"http: 127.0.0.1:{node.monitor_port}",
            # Room for a 1 MiB body and its headers.
            "max_payload: 2MB",
            "jetstream {",
            f'  store_dir: "{self.directory / node.name}"',
            "  max_memory_store: 64MB",
            "  max_file_store: 1GB",
            "}",
        ]
        if len(self.nodes) > 1:
            routes = ", ".join(
                f"nats-route://127.0.0.1:{other.cluster_port}"
                for other in self.nodes
                if other is not node
            )
            lines += [
                "cluster {",
                f"  name: {CLUSTER_NAME}",
                f"  listen: 127.0.0.1:{node.cluster_port}",
                f"  routes: [{routes}]",
                "}",
            ]
        if authorization:
            lines.append(f"authorization {{ {authorization} }}")
        return "\n".join(lines) + "\n"

    async def start(self, timeout: float = 30) -> None:
        """Start every node and wait until JetStream has a leader on each."""
        for node in self.nodes:
            node.start(self.server)
        await self.wait_ready(timeout)

    async def start_node(self, node: NatsNode, timeout: float = 30) -> None:
        node.start(self.server)
        await self.wait_ready(timeout)

    async def wait_ready(self, timeout: float = 30) -> None:
        """Wait until every running node reports a JetStream meta leader."""
        deadline = time.monotonic() + timeout
        running = [n for n in self.nodes if n.proc and n.proc.poll() is None]
        while not all(self._has_leader(node) for node in running):
            if time.monotonic() > deadline:
                raise AssertionError("the NATS cluster did not form in time")
            for node in running:
                assert node.proc is not None
                if node.proc.poll() is not None:
                    log = (self.directory / f"{node.name}.log").read_text()
                    raise AssertionError(f"nats-server {node.name} exited:\n{log}")
            await asyncio.sleep(0.05)

    def _has_leader(self, node: NatsNode) -> bool:
        jsz = node.monitor("/jsz")
        if jsz is None or jsz.get("disabled"):
            return False
        if len(self.nodes) == 1:
            return True
        meta = jsz.get("meta_cluster") or {}
        return bool(meta.get("leader")) and meta.get("cluster_size") == len(self.nodes)

    @contextlib.asynccontextmanager
    async def jetstream(self, **options: Any) -> AsyncIterator[JetStreamContext]:
        """A JetStream client connected to the running nodes."""
        import nats

        client = await nats.connect(self.urls.split(","), **options)
        try:
            yield client.jetstream()
        finally:
            await client.close()

    async def stream_info(self, stream: str) -> StreamInfo:
        async with self.jetstream() as js:
            return await js.stream_info(stream)

    def node_named(self, name: str) -> NatsNode:
        return next(node for node in self.nodes if node.name == name)

    def stop(self) -> None:
        """Kill every node that still runs."""
        for node in self.nodes:
            node.kill()
