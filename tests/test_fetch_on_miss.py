"""Fetch on miss: unknown shops asked of a fake Billing API, stored in SQLite."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from conftest import FakeClock, subscription_event
from fake_billing import Failure, FakeBilling, running_fake_billing, subscription
from sidecar.billing import BillingClient
from sidecar.events import parse_event
from sidecar.fetch import Fetcher, FetchStatus
from sidecar.replay import rebuild
from sidecar.storage import Delivery, Writer, open_database, record_delivery

SHOP = "shop-1"
PRODUCT = "mymodule"
VERSION = 1_700_000_000_123


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "sidecar.db"


@pytest.fixture
async def writer(db: Path) -> AsyncIterator[Writer]:
    writer = Writer(str(db), 5000)
    await writer.start()
    yield writer
    await writer.close()


@pytest.fixture
async def billing() -> AsyncIterator[FakeBilling]:
    async with running_fake_billing() as fake:
        fake.subscriptions[(SHOP, PRODUCT)] = subscription("active", VERSION)
        yield fake


@pytest.fixture
async def client(billing: FakeBilling) -> AsyncIterator[BillingClient]:
    async with billing.client() as client:
        yield client


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def fetcher(
    client: BillingClient, writer: Writer, clock: FakeClock
) -> AsyncIterator[Fetcher]:
    fetcher = Fetcher(client, writer, budget_s=1.0, clock=clock)
    yield fetcher
    await fetcher.close()


def query(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, params).fetchall()


async def test_fetch_of_unknown_shop_stores_an_api_delivery_and_answers(
    fetcher: Fetcher, db: Path
) -> None:
    result = await fetcher.fetch(SHOP, PRODUCT)

    assert result.status is FetchStatus.FOUND
    assert result.entitlement is not None
    assert result.entitlement.status == "active"
    assert result.entitlement.plan == "mymodule-pro"
    assert query(db, "SELECT delivery_id, source, result, version FROM deliveries") == [
        (f"api:{SHOP}:{PRODUCT}:{VERSION}", "api", "applied", VERSION)
    ]
    assert query(db, "SELECT shop_id, product, status FROM entitlements") == [
        (SHOP, PRODUCT, "active")
    ]


async def test_refetch_of_the_same_state_is_a_duplicate(
    fetcher: Fetcher, db: Path
) -> None:
    await fetcher.fetch(SHOP, PRODUCT)
    await fetcher.fetch(SHOP, PRODUCT)

    assert query(db, "SELECT count(*) FROM deliveries") == [(1,)]


async def test_concurrent_lookups_of_one_shop_send_one_request(
    fetcher: Fetcher, billing: FakeBilling
) -> None:
    billing.api_delay_s = 0.2

    results = await asyncio.gather(*(fetcher.fetch(SHOP, PRODUCT) for _ in range(20)))

    assert {result.status for result in results} == {FetchStatus.FOUND}
    assert billing.api_requests == 1


async def test_shop_unknown_to_the_api_is_not_asked_again_until_the_ttl(
    fetcher: Fetcher, billing: FakeBilling, clock: FakeClock, db: Path
) -> None:
    first = await fetcher.fetch("shop-unknown", PRODUCT)
    second = await fetcher.fetch("shop-unknown", PRODUCT)
    assert (first.status, second.status) == (FetchStatus.UNKNOWN, FetchStatus.UNKNOWN)
    assert billing.api_requests == 1

    clock.now += 601
    await fetcher.fetch("shop-unknown", PRODUCT)

    assert billing.api_requests == 2
    assert query(db, "SELECT count(*) FROM deliveries") == [(0,)]


async def test_flood_of_random_unknown_ids_is_bounded_by_the_rate_limit(
    fetcher: Fetcher, billing: FakeBilling, clock: FakeClock
) -> None:
    shops = [uuid.uuid4().hex for _ in range(200)]

    results = await asyncio.gather(*(fetcher.fetch(shop, PRODUCT) for shop in shops))

    statuses = [result.status for result in results]
    assert statuses.count(FetchStatus.UNKNOWN) == 10
    assert statuses.count(FetchStatus.RATE_LIMITED) == 190
    assert billing.api_requests == 10

    # The bucket refills at 5 per second.
    clock.now += 1
    await asyncio.gather(*(fetcher.fetch(uuid.uuid4().hex, PRODUCT) for _ in range(50)))
    assert billing.api_requests == 15


@pytest.mark.parametrize(
    "trouble",
    [
        {"always_fail": Failure(503)},
        {"api_delay_s": 3.0},
        {"subscriptions": {(SHOP, PRODUCT): {"plan_id": "no-status"}}},
    ],
    ids=["server-error", "timeout", "bad-body"],
)
async def test_upstream_failure_answers_upstream_unavailable_and_stores_nothing(
    fetcher: Fetcher, billing: FakeBilling, db: Path, trouble: dict[str, Any]
) -> None:
    for name, value in trouble.items():
        setattr(billing, name, value)

    result = await fetcher.fetch(SHOP, PRODUCT)

    assert result.status is FetchStatus.UNAVAILABLE
    assert result.status.value == "upstream_unavailable"
    assert result.entitlement is None
    assert query(db, "SELECT count(*) FROM deliveries") == [(0,)]


async def test_upstream_failure_is_not_cached_as_unknown(
    fetcher: Fetcher, billing: FakeBilling
) -> None:
    billing.failures = [Failure(500)] * 3
    assert (await fetcher.fetch(SHOP, PRODUCT)).status is FetchStatus.UNAVAILABLE

    assert (await fetcher.fetch(SHOP, PRODUCT)).status is FetchStatus.FOUND


async def test_fetched_state_older_than_a_stored_webhook_is_stale(
    fetcher: Fetcher, writer: Writer, db: Path
) -> None:
    body = subscription_event(SHOP, "cancelled", resource_version=VERSION + 1000)
    webhook = Delivery(
        delivery_id="msg_1",
        received_at=1_700_000_100,
        source="webhook",
        event=parse_event(body, None, "default"),
        fallback_version=0,
        body=None,
    )
    await writer.submit(lambda conn: record_delivery(conn, webhook))

    result = await fetcher.fetch(SHOP, PRODUCT)

    assert result.entitlement is not None
    assert result.entitlement.status == "cancelled"
    assert query(db, "SELECT result FROM deliveries WHERE source = 'api'") == [
        ("stale",)
    ]


async def test_fetched_delivery_is_reproduced_by_replay(
    fetcher: Fetcher, db: Path
) -> None:
    await fetcher.fetch(SHOP, PRODUCT)

    conn = open_database(str(db))
    try:
        assert rebuild(conn, dry_run=True) == []
        conn.execute("DELETE FROM entitlements")
        assert len(rebuild(conn)) == 1
    finally:
        conn.close()
    assert query(db, "SELECT status, version FROM entitlements") == [
        ("active", VERSION)
    ]
