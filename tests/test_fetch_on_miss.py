"""Fetch on miss: unknown shops asked of a fake Billing API, stored in SQLite."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from conftest import FakeClock, StartSidecar, run_cli, subscription_event
from fake_billing import (
    Failure,
    FakeBilling,
    running_fake_billing,
    subscription,
)
from sidecar.billing import BillingClient
from sidecar.events import parse_event
from sidecar.fetch import BURST, RATE_PER_S, Fetcher, FetchStatus
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


# Through the lookup listener, with the fetcher built from the settings.


def billing_env(fake: FakeBilling, **extra: str) -> dict[str, str]:
    return {
        **fake.settings_env(),
        "SIDECAR_FETCH_ON_MISS": "true",
        "SIDECAR_PRODUCT": PRODUCT,
        **extra,
    }


async def test_lookup_of_shop_known_only_to_the_api_answers_from_it(
    start_sidecar: StartSidecar, billing: FakeBilling
) -> None:
    sidecar = await start_sidecar(billing_env(billing))

    status, body = await sidecar.get(f"/entitlement/{SHOP}")

    assert status == 200
    assert (body["entitled"], body["status"], body["reason"]) == (
        True,
        "active",
        "active",
    )
    assert sidecar.query("SELECT source, result FROM deliveries") == [
        ("api", "applied")
    ]
    # The next lookup is answered from the table without asking again.
    assert (await sidecar.get(f"/entitlement/{SHOP}"))[0] == 200
    assert billing.api_requests == 1


async def test_lookup_of_shop_unknown_to_the_api_is_unknown_shop(
    start_sidecar: StartSidecar, billing: FakeBilling
) -> None:
    sidecar = await start_sidecar(billing_env(billing))

    status, body = await sidecar.get("/entitlement/nobody-here")

    assert status == 404
    assert body == {
        "shop_id": "nobody-here",
        "entitled": False,
        "status": "unknown",
        "reason": "unknown_shop",
    }
    assert sidecar.query("SELECT count(*) FROM deliveries") == [(0,)]


async def test_lookup_with_api_down_is_404_upstream_unavailable(
    start_sidecar: StartSidecar, billing: FakeBilling
) -> None:
    billing.always_fail = Failure(503)
    sidecar = await start_sidecar(billing_env(billing))

    status, body = await sidecar.get(f"/entitlement/{SHOP}")

    assert status == 404
    assert (body["entitled"], body["reason"]) == (False, "upstream_unavailable")
    assert sidecar.query("SELECT count(*) FROM deliveries") == [(0,)]


async def test_lookup_without_fetch_on_miss_never_asks_the_api(
    start_sidecar: StartSidecar, billing: FakeBilling
) -> None:
    sidecar = await start_sidecar(billing_env(billing, SIDECAR_FETCH_ON_MISS="false"))

    status, body = await sidecar.get(f"/entitlement/{SHOP}")

    assert (status, body["reason"]) == (404, "unknown_shop")
    assert billing.token_requests == billing.api_requests == 0


async def test_lookup_flood_of_unknown_ids_through_the_listener_is_bounded(
    start_sidecar: StartSidecar, billing: FakeBilling
) -> None:
    sidecar = await start_sidecar(billing_env(billing))

    started = time.monotonic()
    answers = await asyncio.gather(
        *(sidecar.get(f"/entitlement/random-{uuid.uuid4().hex}") for _ in range(60))
    )
    elapsed_s = time.monotonic() - started

    assert {status for status, _ in answers} == {404}
    reasons = {body["reason"] for _, body in answers}
    assert reasons == {"unknown_shop", "upstream_unavailable"}
    # Only the token bucket's burst, and what it refilled meanwhile, reach the API.
    assert billing.api_requests <= BURST + int(RATE_PER_S * elapsed_s) + 1


def test_serve_with_fetch_on_miss_but_no_credentials_exits_2(tmp_path: Path) -> None:
    result = run_cli(
        "serve",
        "--db",
        str(tmp_path / "sidecar.db"),
        env={"SIDECAR_FETCH_ON_MISS": "true"},
    )

    assert result.returncode == 2
    assert "SIDECAR_FETCH_ON_MISS" in result.stderr
    assert "SIDECAR_BILLING_CLIENT_ID" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
