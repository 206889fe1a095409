"""An acknowledged delivery survives `kill -9` in the middle of a stream of them.

Several senders post signed deliveries to a child sidecar while it is killed
with SIGKILL, twice, and restarted on the same database. Every delivery that
was answered 2xx must then be stored and applied, and rebuilding the
entitlement table from the stored deliveries must change nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from conftest import Process, run_cli, signed_headers, subscription_event

# Run these alone with `pytest -m reliability`.
pytestmark = pytest.mark.reliability

PRODUCT = "crash-module"
SENDERS = 6
SHOPS_PER_SENDER = 4
ACKS_BEFORE_KILL = 150
STATUSES = ("in_trial", "active", "non_renewing", "cancelled", "active", "paused")
BASE_VERSION = 1_700_000_000_000


@dataclass(frozen=True)
class Sent:
    """One delivery as sent: what the entitlement row must hold if it is newest."""

    delivery_id: str
    shop_id: str
    version: int
    status: str
    plan: str
    body: bytes


def _stream(round_name: str, sender: int) -> Iterator[Sent]:
    """An endless history for one sender's shops, with late events and retries."""
    previous: Sent | None = None
    n = 0
    while True:
        n += 1
        if previous is not None and n % 10 == 0:
            # Billing retrying a delivery it did not see answered: same id.
            yield previous
            continue
        shop_id = f"{round_name}-{sender}-{n % SHOPS_PER_SENDER}"
        version = BASE_VERSION + 10 * n
        if n % 7 == 0:
            # A late event, older than what the shop already received.
            version -= 10 * 2 * SHOPS_PER_SENDER + 5
        status, plan = STATUSES[n % len(STATUSES)], f"plan-{n % 3}"
        body = subscription_event(
            shop_id, status, product=PRODUCT, plan_id=plan, resource_version=version
        )
        previous = Sent(
            delivery_id=f"{round_name}-{sender}-{n}",
            shop_id=shop_id,
            version=version,
            status=status,
            plan=plan,
            body=json.dumps(body).encode(),
        )
        yield previous


async def _send_until_refused(
    session: aiohttp.ClientSession,
    webhook_url: str,
    stream: Iterator[Sent],
    sent: dict[str, Sent],
    acked: list[Sent],
    enough: asyncio.Event,
) -> None:
    for delivery in stream:
        sent[delivery.delivery_id] = delivery
        headers = signed_headers(delivery.body, delivery_id=delivery.delivery_id)
        try:
            async with session.post(
                webhook_url + "/webhooks", data=delivery.body, headers=headers
            ) as response:
                await response.read()
        except (aiohttp.ClientError, TimeoutError):
            return
        assert response.status == 200, f"{delivery.delivery_id}: {response.status}"
        acked.append(delivery)
        if len(acked) >= ACKS_BEFORE_KILL:
            enough.set()


async def _send_and_kill(
    process: Process, round_name: str, sent: dict[str, Sent], acked: list[Sent]
) -> None:
    enough = asyncio.Event()
    round_acked: list[Sent] = []
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        senders = [
            asyncio.create_task(
                _send_until_refused(
                    session,
                    process.webhook_url,
                    _stream(round_name, sender),
                    sent,
                    round_acked,
                    enough,
                )
            )
            for sender in range(SENDERS)
        ]
        await asyncio.wait_for(enough.wait(), 30)
        process.kill()
        await asyncio.gather(*senders)
    acked.extend(round_acked)


def _newest_stored(conn: sqlite3.Connection, sent: dict[str, Sent]) -> dict[str, Sent]:
    newest: dict[str, Sent] = {}
    for (delivery_id,) in conn.execute("SELECT delivery_id FROM deliveries"):
        delivery = sent[delivery_id]
        current = newest.get(delivery.shop_id)
        if current is None or delivery.version > current.version:
            newest[delivery.shop_id] = delivery
    return newest


@pytest.mark.slow
async def test_kill_9_mid_stream_keeps_every_acknowledged_delivery(
    sidecar_process: Callable[..., Process], tmp_path: Path
) -> None:
    sent: dict[str, Sent] = {}
    acked: list[Sent] = []
    for round_name in ("first", "second"):
        process = sidecar_process()
        await _send_and_kill(process, round_name, sent, acked)
    restarted = sidecar_process()

    with contextlib.closing(sqlite3.connect(restarted.db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        stored = {row[0] for row in conn.execute("SELECT delivery_id FROM deliveries")}
        missing = {delivery.delivery_id for delivery in acked} - stored
        assert not missing, f"acknowledged but lost: {sorted(missing)}"

        newest = _newest_stored(conn, sent)
        rows = {
            shop_id: (plan, status, version)
            for shop_id, plan, status, version in conn.execute(
                "SELECT shop_id, plan, status, version FROM entitlements"
            )
        }
    assert rows == {
        shop_id: (delivery.plan, delivery.status, delivery.version)
        for shop_id, delivery in newest.items()
    }

    async with aiohttp.ClientSession() as session:
        for shop_id, delivery in newest.items():
            url = f"{restarted.lookup_url}/entitlement/{shop_id}?product={PRODUCT}"
            async with session.get(url) as response:
                answer = await response.json()
            assert (response.status, answer["status"]) == (200, delivery.status)
    assert restarted.terminate() == 0

    replay = run_cli("replay", "--dry-run", env={"SIDECAR_DB": str(restarted.db)})
    assert replay.returncode == 0, replay.stderr
    assert "would change 0 row(s)" in replay.stdout, replay.stdout
