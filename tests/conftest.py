"""Fixtures that run the real sidecar on OS-assigned loopback ports.

`sidecar` starts the server in the test's event loop (so a test can move its
clock); `sidecar_process` runs `python -m sidecar serve` as a child process, for
tests that need signals, crashes or the command line.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from standardwebhooks.webhooks import Webhook

from sidecar.server import Server
from sidecar.settings import load_secrets, load_settings

# Example bodies in the shapes Billing sends: envelope-* and draft-* are ours,
# prestashop-docs/ holds the examples of Billing's own webhook reference.
EVENTS_DIR = Path(__file__).resolve().parent / "events"
# The schema as the first release created it, to test upgrades from.
SCHEMA_V1_SQL = Path(__file__).resolve().parent / "schema_v1.sql"
SECRET = "whsec_" + base64.b64encode(b"test-signing-secret-0123456789").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"another-secret-abcdefghijklmn").decode()
BASIC_TOKEN = "billing:s3cret-pass"


def example(name: str) -> dict[str, Any]:
    """Load an example body from tests/events/."""
    path = EVENTS_DIR / name
    if not path.exists():
        path = EVENTS_DIR / "prestashop-docs" / name
    return json.loads(path.read_text())


def signed_headers(
    body: bytes,
    secret: str = SECRET,
    delivery_id: str | None = None,
    timestamp: float | None = None,
    prefix: str = "webhook-",
) -> dict[str, str]:
    """Headers that sign `body` the way Billing (through Svix) does."""
    delivery_id = delivery_id or f"msg_{time.monotonic_ns()}"
    moment = datetime.fromtimestamp(
        time.time() if timestamp is None else timestamp, UTC
    )
    signature = Webhook(secret).sign(delivery_id, moment, body)
    return {
        f"{prefix}id": delivery_id,
        f"{prefix}timestamp": str(int(moment.timestamp())),
        f"{prefix}signature": signature,
        "Content-Type": "application/json",
    }


def basic_headers(token: str = BASIC_TOKEN) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(token.encode()).decode()}


def subscription_event(
    shop_id: str, status: str, product: str = "mymodule", **fields: Any
) -> dict[str, Any]:
    """An envelope `subscription.updated` body; `fields` go on the subscription."""
    subscription = {
        "id": f"sub-{shop_id}",
        "plan_id": "mymodule-pro",
        "status": status,
        "meta_data": {"module": product},
        **fields,
    }
    return {
        "eventType": "subscription.updated",
        "data": {"shopId": shop_id, "subscription": subscription},
    }


def customer_event(
    shop_id: str, deleted: bool, resource_version: int
) -> dict[str, Any]:
    """An envelope `customer.updated` body setting the customer's `deleted` flag."""
    customer = {"deleted": deleted, "resource_version": resource_version}
    return {
        "eventType": "customer.updated",
        "data": {"shopId": shop_id, "customer": customer},
    }


class FakeClock:
    """A clock the test moves by hand; starts at the real time."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class Running:
    """A started sidecar and a client session to talk to it."""

    server: Server
    session: aiohttp.ClientSession
    clock: FakeClock
    db: Path
    webhook_url: str = ""
    lookup_url: str = ""
    lookup_session: aiohttp.ClientSession | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    async def post(
        self,
        body: bytes | dict[str, Any],
        headers: dict[str, str] | None = None,
        path: str = "/webhooks",
        sign: bool = True,
        **sign_args: Any,
    ) -> tuple[int, dict[str, Any]]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        all_headers = signed_headers(raw, **sign_args) if sign else {}
        all_headers.update(headers or {})
        async with self.session.post(
            self.webhook_url + path, data=raw, headers=all_headers
        ) as response:
            return response.status, await _json(response)

    async def get(self, path: str) -> tuple[int, dict[str, Any]]:
        session = self.lookup_session or self.session
        async with session.get(self.lookup_url + path) as response:
            return response.status, await _json(response)

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.db) as conn:
            return conn.execute(sql, params).fetchall()


async def _json(response: aiohttp.ClientResponse) -> dict[str, Any]:
    text = await response.text()
    try:
        value = json.loads(text)
    except ValueError:
        return {"_text": text}
    return value if isinstance(value, dict) else {"_value": value}


StartSidecar = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_sidecar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[StartSidecar]:
    """Start sidecars with the given settings; all are stopped after the test."""
    started: list[Running] = []

    async def start(env: dict[str, str] | None = None, **flags: Any) -> Running:
        for key in list(os.environ):
            if key.startswith("SIDECAR_") or key == "CREDENTIALS_DIRECTORY":
                monkeypatch.delenv(key)
        base_env = {"SIDECAR_WEBHOOK_SECRET": SECRET}
        for key, value in {**base_env, **(env or {})}.items():
            monkeypatch.setenv(key, value)
        db = Path(flags.pop("db", tmp_path / f"sidecar{len(started)}.db"))
        flags.setdefault("webhook_listen", "127.0.0.1:0")
        flags.setdefault("lookup_listen", "127.0.0.1:0")
        settings = load_settings(None, {"db": str(db), **flags})
        clock = FakeClock()
        server = Server(settings, load_secrets(settings), clock=clock)
        await server.start()
        session = aiohttp.ClientSession()
        running = Running(server=server, session=session, clock=clock, db=db)
        running.webhook_url = "http://" + server.address(0)
        lookup_address = server.address(1)
        if lookup_address.startswith("unix:"):
            running.lookup_session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=lookup_address[5:])
            )
            running.lookup_url = "http://localhost"
        else:
            running.lookup_url = "http://" + lookup_address
        started.append(running)
        return running

    yield start
    for running in started:
        await running.session.close()
        if running.lookup_session is not None:
            await running.lookup_session.close()
        await running.server.stop()


@pytest.fixture
async def sidecar(start_sidecar: StartSidecar) -> Running:
    """A sidecar with the test signing secret and default settings."""
    return await start_sidecar()


@dataclass
class Process:
    """A sidecar running as a child process."""

    proc: subprocess.Popen[str]
    webhook_url: str
    lookup_url: str
    db: Path
    env: dict[str, str]
    # What the child logged up to its "listening" line: start-up warnings.
    startup_log: list[str] = field(default_factory=list)

    def terminate(self, timeout: float = 15) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


_LISTENING = re.compile(r"listening for webhooks on (\S+) and lookups on (\S+),")


def spawn_sidecar(
    db: Path, env: dict[str, str] | None = None, args: list[str] | None = None
) -> Process:
    """Start `python -m sidecar serve` and wait until it reports its addresses."""
    full_env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("SIDECAR_") and key != "NOTIFY_SOCKET"
    }
    full_env.update(
        {
            "SIDECAR_WEBHOOK_SECRET": SECRET,
            "SIDECAR_WEBHOOK_LISTEN": "127.0.0.1:0",
            "SIDECAR_LOOKUP_LISTEN": "127.0.0.1:0",
            "SIDECAR_DB": str(db),
            "PYTHONUNBUFFERED": "1",
        }
    )
    full_env.update(env or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", *(args or [])],
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 20
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        match = _LISTENING.search(line)
        if match:
            # Keep draining stderr so the child never blocks on a full pipe.
            _drain(proc)
            webhook, lookup = match.groups()
            return Process(
                proc=proc,
                webhook_url=_url(webhook),
                lookup_url=_url(lookup),
                db=db,
                env=full_env,
                startup_log=seen,
            )
    proc.kill()
    raise RuntimeError("the sidecar did not start:\n" + "".join(seen))


def _url(address: str) -> str:
    return address if address.startswith("unix:") else "http://" + address


def _drain(proc: subprocess.Popen[str]) -> None:
    import threading

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            proc_lines.append(line)

    proc_lines: list[str] = []
    proc.stderr_lines = proc_lines  # type: ignore[attr-defined]
    threading.Thread(target=read, daemon=True).start()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client of its own, for tests that talk to several sidecars."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as client:
        yield client


@pytest.fixture
def sidecar_process(tmp_path: Path) -> Iterator[Callable[..., Process]]:
    """Start sidecar child processes; any still running are killed afterwards."""
    started: list[Process] = []

    def start(
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        db: Path | None = None,
    ) -> Process:
        process = spawn_sidecar(db or tmp_path / "sidecar.db", env, args)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.proc.poll() is None:
            process.kill()


def run_cli(
    *args: str,
    env: dict[str, str] | None = None,
    input_text: str | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m sidecar ARGS` with a clean SIDECAR_* environment."""
    full_env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("SIDECAR_")
    }
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        env=full_env,
        input=input_text,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def wait_for(
    predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02
) -> None:
    """Wait until `predicate()` holds, for conditions no event announces."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)
