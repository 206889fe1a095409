"""The Billing API client and its access token, against a fake API on loopback."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest

from conftest import FakeClock
from fake_billing import (
    CLIENT_ID,
    CLIENT_SECRET,
    Failure,
    FakeBilling,
    running_fake_billing,
    subscription,
)
from sidecar.billing import (
    BillingAuthError,
    BillingBadResponse,
    BillingClient,
    BillingUnavailable,
    credentials_from_settings,
)
from sidecar.settings import Secrets, SettingsError, load_settings

SHOP = "shop-1"
PRODUCT = "mymodule"


@pytest.fixture
async def billing() -> AsyncIterator[FakeBilling]:
    async with running_fake_billing() as fake:
        fake.subscriptions[(SHOP, PRODUCT)] = subscription("active", 1_700_000_000_123)
        yield fake


@pytest.fixture
async def client(billing: FakeBilling) -> AsyncIterator[BillingClient]:
    async with billing.client() as client:
        yield client


async def test_access_token_is_reused_across_requests(
    billing: FakeBilling, client: BillingClient
) -> None:
    for _ in range(3):
        assert await client.fetch_subscription(SHOP, PRODUCT) is not None

    assert billing.token_requests == 1
    assert billing.api_requests == 3


async def test_access_token_near_expiry_is_renewed_before_use(
    billing: FakeBilling,
) -> None:
    billing.token_lifetime_s = 600
    clock = FakeClock()
    async with billing.client(clock=clock) as client:
        await client.fetch_subscription(SHOP, PRODUCT)
        clock.now += 530
        await client.fetch_subscription(SHOP, PRODUCT)
        assert billing.token_requests == 1

        # Inside the last minute of the token's life: renewed before it lapses.
        clock.now += 20
        await client.fetch_subscription(SHOP, PRODUCT)

    assert billing.token_requests == 2


async def test_token_refresh_with_many_concurrent_callers_requests_one_token(
    billing: FakeBilling, client: BillingClient
) -> None:
    billing.token_delay_s = 0.2

    results = await asyncio.gather(
        *(client.fetch_subscription(SHOP, PRODUCT) for _ in range(50))
    )

    assert all(result is not None for result in results)
    assert billing.token_requests == 1
    assert billing.api_requests == 50


async def test_token_request_sends_grant_audience_and_scopes(
    billing: FakeBilling,
) -> None:
    credentials = billing.credentials(audience="billing-api", scopes="read write")
    async with billing.client(credentials=credentials) as client:
        await client.fetch_subscription(SHOP, PRODUCT)

    assert billing.token_forms == [
        {
            "grant_type": "client_credentials",
            "audience": "billing-api",
            "scope": "read write",
        }
    ]


async def test_token_request_with_wrong_secret_fails_without_showing_it(
    billing: FakeBilling,
) -> None:
    wrong_secret = "not-the-right-secret-93af"
    credentials = billing.credentials(secret=wrong_secret)
    async with billing.client(credentials=credentials) as client:
        with pytest.raises(BillingAuthError) as raised:
            await client.fetch_subscription(SHOP, PRODUCT)

    message = str(raised.value)
    assert "invalid_client" in message
    assert "SIDECAR_BILLING_CLIENT_ID" in message
    assert wrong_secret not in message
    assert billing.api_requests == 0


async def test_revoked_token_is_replaced_and_the_request_succeeds(
    billing: FakeBilling, client: BillingClient
) -> None:
    await client.fetch_subscription(SHOP, PRODUCT)
    billing.revoke_tokens()

    assert await client.fetch_subscription(SHOP, PRODUCT) is not None

    assert billing.token_requests == 2
    assert billing.api_requests == 3


async def test_revoked_token_seen_by_many_concurrent_callers_is_renewed_once(
    billing: FakeBilling, client: BillingClient
) -> None:
    await client.fetch_subscription(SHOP, PRODUCT)
    billing.revoke_tokens()
    billing.token_delay_s = 0.1

    results = await asyncio.gather(
        *(client.fetch_subscription(SHOP, PRODUCT) for _ in range(20))
    )

    assert all(result is not None for result in results)
    assert billing.token_requests == 2


async def test_api_refusing_a_fresh_token_refreshes_once_then_fails_clearly(
    billing: FakeBilling, client: BillingClient
) -> None:
    billing.reject_all_tokens = True

    with pytest.raises(BillingAuthError, match="HTTP 401") as raised:
        await client.fetch_subscription(SHOP, PRODUCT)

    assert billing.token_requests == 2
    assert billing.api_requests == 2
    assert all(token not in str(raised.value) for token in billing.issued_tokens)


async def test_rate_limited_request_waits_for_retry_after_then_succeeds(
    billing: FakeBilling, client: BillingClient
) -> None:
    billing.failures = [Failure(429, retry_after="1")]

    started = time.monotonic()
    result = await client.fetch_subscription(SHOP, PRODUCT)

    assert result is not None
    assert time.monotonic() - started >= 1.0
    assert billing.api_requests == 2


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_error_once_is_retried_and_succeeds(
    billing: FakeBilling, client: BillingClient, status: int
) -> None:
    billing.failures = [Failure(status)]

    assert await client.fetch_subscription(SHOP, PRODUCT) is not None
    assert billing.api_requests == 2


async def test_server_errors_that_persist_fail_after_three_attempts(
    billing: FakeBilling, client: BillingClient
) -> None:
    billing.always_fail = Failure(503)

    with pytest.raises(BillingUnavailable, match="HTTP 503; gave up after 3"):
        await client.fetch_subscription(SHOP, PRODUCT)
    assert billing.api_requests == 3


async def test_retry_after_beyond_the_budget_fails_without_waiting(
    billing: FakeBilling, client: BillingClient
) -> None:
    billing.always_fail = Failure(429, retry_after="30")

    started = time.monotonic()
    with pytest.raises(BillingUnavailable, match="no time left"):
        await client.fetch_subscription(SHOP, PRODUCT, budget_s=1.0)

    assert time.monotonic() - started < 0.5
    assert billing.api_requests == 1


async def test_slow_api_times_out_within_the_budget(
    billing: FakeBilling, client: BillingClient
) -> None:
    billing.api_delay_s = 2.0

    started = time.monotonic()
    with pytest.raises(BillingUnavailable, match=r"within 0\.3 s"):
        await client.fetch_subscription(SHOP, PRODUCT, budget_s=0.3)

    assert time.monotonic() - started < 1.0


async def test_slow_api_times_out_on_the_request_timeout(
    billing: FakeBilling,
) -> None:
    billing.api_delay_s = 2.0
    async with billing.client(timeout_s=0.2, max_attempts=1) as client:
        with pytest.raises(BillingUnavailable, match="did not answer in time"):
            await client.fetch_subscription(SHOP, PRODUCT)


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "wrapped"])
async def test_subscription_bare_or_wrapped_parses_the_same(
    billing: FakeBilling, client: BillingClient, wrapped: bool
) -> None:
    sub = subscription("in_trial", 1_700_000_000_456, trial_end=1_701_209_600)
    billing.subscriptions[(SHOP, PRODUCT)] = {"subscription": sub} if wrapped else sub

    fetched = await client.fetch_subscription(SHOP, PRODUCT)

    assert fetched is not None
    assert (fetched.shop_id, fetched.product) == (SHOP, PRODUCT)
    assert fetched.state.status == "in_trial"
    assert fetched.state.plan == "mymodule-pro"
    assert fetched.state.trial_end == 1_701_209_600
    assert fetched.state.resource_version == 1_700_000_000_456


async def test_subscription_of_the_item_catalogue_reads_the_plan_entry(
    billing: FakeBilling, client: BillingClient
) -> None:
    billing.subscriptions[(SHOP, PRODUCT)] = {
        "status": "active",
        "resource_version": 1_702_000_000_321,
        "subscription_items": [
            {"item_price_id": "addon-EUR", "item_type": "addon"},
            {"item_price_id": "mymodule-pro-EUR-monthly", "item_type": "plan"},
        ],
    }

    fetched = await client.fetch_subscription(SHOP, PRODUCT)

    assert fetched is not None
    assert fetched.state.plan == "mymodule-pro-EUR-monthly"


async def test_shop_unknown_to_the_api_returns_none(
    billing: FakeBilling, client: BillingClient
) -> None:
    assert await client.fetch_subscription("shop-unknown", PRODUCT) is None
    assert billing.api_paths == ["/v1/customers/shop-unknown/subscriptions/mymodule"]


@pytest.mark.parametrize(
    "body",
    [b"<html>maintenance</html>", b"[1, 2]", b'{"id": "sub-1"}'],
    ids=["not-json", "not-an-object", "no-status"],
)
async def test_unusable_body_is_a_bad_response(
    billing: FakeBilling, client: BillingClient, body: bytes
) -> None:
    billing.subscriptions[(SHOP, PRODUCT)] = body

    with pytest.raises(BillingBadResponse):
        await client.fetch_subscription(SHOP, PRODUCT)


@pytest.mark.parametrize("product", ["..", "a/b"])
async def test_product_that_is_not_a_path_segment_is_refused(
    billing: FakeBilling, client: BillingClient, product: str
) -> None:
    with pytest.raises(ValueError, match="expected a product"):
        await client.fetch_subscription(SHOP, product)
    assert billing.api_requests == 0


async def test_failures_never_log_the_secret_or_a_token(
    billing: FakeBilling, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    billing.failures = [Failure(503), Failure(429, retry_after="0")]
    async with billing.client() as client:
        await client.fetch_subscription(SHOP, PRODUCT)
        billing.reject_all_tokens = True
        with pytest.raises(BillingAuthError):
            await client.fetch_subscription(SHOP, PRODUCT)

    assert "retrying" in caplog.text
    assert CLIENT_SECRET not in caplog.text
    assert billing.issued_tokens
    assert all(token not in caplog.text for token in billing.issued_tokens)


def test_credentials_without_client_id_or_secret_are_none() -> None:
    settings = load_settings(None, {"db": "unused.db"})

    assert credentials_from_settings(settings, Secrets()) is None


def test_credentials_from_settings_normalise_scopes() -> None:
    settings = load_settings(
        None,
        {"billing_client_id": CLIENT_ID, "billing_scopes": "read, write  admin"},
    )

    credentials = credentials_from_settings(
        settings, Secrets(billing_client_secret=CLIENT_SECRET)
    )

    assert credentials is not None
    assert credentials.scopes == "read write admin"
    assert CLIENT_SECRET not in repr(credentials)


def test_credentials_with_client_id_but_no_secret_are_refused() -> None:
    settings = load_settings(None, {"billing_client_id": CLIENT_ID})

    with pytest.raises(SettingsError, match="SIDECAR_BILLING_CLIENT_SECRET"):
        credentials_from_settings(settings, Secrets())
