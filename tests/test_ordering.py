"""Event ordering: late and out-of-order deliveries settle on the newest state."""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest

from conftest import (
    BASIC_TOKEN,
    Running,
    StartSidecar,
    basic_headers,
    customer_event,
    example,
    subscription_event,
)

SHOP = "3f9c2b7e-51d4-4c1a-9e0b-7a6d2c8e1f43"
DRAFT_SHOP = "8d0e6a52-93b1-4f0e-b2c4-5b7f1e2a9c60"


def _row(sidecar: Running, shop_id: str = SHOP) -> tuple[Any, ...]:
    [row] = sidecar.query(
        "SELECT status, plan, version, delivery_id FROM entitlements WHERE shop_id = ?",
        shop_id,
    )
    return row


def _state(status: str, **fields: Any) -> dict[str, Any]:
    return subscription_event(SHOP, status, **fields)


# --- which version an event has ---------------------------------------------


@pytest.mark.parametrize(
    ("newer", "older"),
    [
        (
            {"resource_version": 2_000_000_000_001},
            {"resource_version": 2_000_000_000_000},
        ),
        ({"updated_at": 2_000_000_001}, {"updated_at": 2_000_000_000}),
        (
            {"resource_version": 2_000_000_000_000, "updated_at": 1_000_000_000},
            {"resource_version": 1_999_999_999_999, "updated_at": 2_000_000_000},
        ),
    ],
    ids=["resource_version", "updated_at", "resource_version-over-updated_at"],
)
async def test_older_state_after_newer_is_stale_and_changes_nothing(
    sidecar: Running, newer: dict[str, Any], older: dict[str, Any]
) -> None:
    await sidecar.post(_state("cancelled", **newer), delivery_id="msg_newer")
    before = _row(sidecar)

    status, answer = await sidecar.post(_state("active", **older))

    assert (status, answer["result"]) == (200, "stale")
    assert _row(sidecar) == before
    assert before[3] == "msg_newer"


RV, UPDATED = "resource_version", "updated_at"


@pytest.mark.parametrize(
    ("first", "second", "result"),
    [
        ((RV, 1_700_000_000_456), (RV, 1_700_000_000_457), "applied"),
        ((RV, 1_700_000_000_456), (RV, 1_700_000_000_456), "stale"),
        ((RV, 1_700_000_000_456), (RV, 1_700_000_000_455), "stale"),
        ((UPDATED, 1_700_000_000), (UPDATED, 1_700_000_001), "applied"),
        ((UPDATED, 1_700_000_000), (UPDATED, 1_700_000_000), "stale"),
        # Both end up in milliseconds, so the two fields compare with each other.
        ((RV, 1_700_000_000_456), (UPDATED, 1_700_000_001), "applied"),
        ((RV, 1_700_000_000_456), (UPDATED, 1_700_000_000), "stale"),
        ((UPDATED, 1_700_000_000), (RV, 1_700_000_000_001), "applied"),
    ],
)
async def test_second_state_is_applied_only_when_its_version_is_newer(
    sidecar: Running, first: tuple[str, int], second: tuple[str, int], result: str
) -> None:
    await sidecar.post(_state("in_trial", **dict([first])))

    status, answer = await sidecar.post(_state("active", **dict([second])))

    assert (status, answer["result"]) == (200, result)
    expected_status = "active" if result == "applied" else "in_trial"
    assert _row(sidecar)[0] == expected_status


@pytest.mark.parametrize(
    ("first_offset_s", "second_offset_s", "result"),
    [(-200, -100, "applied"), (-100, -200, "stale"), (-100, -100, "stale")],
)
async def test_state_without_version_is_ordered_by_signed_timestamp(
    sidecar: Running, first_offset_s: int, second_offset_s: int, result: str
) -> None:
    now = time.time()
    await sidecar.post(_state("in_trial"), timestamp=now + first_offset_s)

    status, answer = await sidecar.post(
        _state("active"), timestamp=now + second_offset_s
    )

    kept_offset_s = second_offset_s if result == "applied" else first_offset_s
    assert (status, answer["result"]) == (200, result)
    assert _row(sidecar)[2] == int(now + kept_offset_s) * 1000


async def test_signed_timestamp_is_stored_as_the_version_in_milliseconds(
    sidecar: Running,
) -> None:
    signed_at = int(time.time()) - 60

    await sidecar.post(_state("active"), timestamp=signed_at)

    assert _row(sidecar)[2] == signed_at * 1000


async def test_unsigned_state_without_version_is_ordered_by_receipt_time(
    start_sidecar: StartSidecar,
) -> None:
    sidecar = await start_sidecar(
        env={"SIDECAR_WEBHOOK_SECRET": "", "SIDECAR_BASIC_AUTH": BASIC_TOKEN}
    )
    start = sidecar.clock.now

    async def post(status: str, at: float) -> str:
        sidecar.clock.now = at
        _, answer = await sidecar.post(
            _state(status), headers=basic_headers(), sign=False
        )
        return str(answer["result"])

    results = [
        await post("in_trial", start),
        await post("active", start + 10),
        await post("paused", start + 5),
    ]

    assert results == ["applied", "applied", "stale"]
    assert _row(sidecar)[:3] == ("active", "mymodule-pro", int((start + 10) * 1000))


# --- out of order, late, repeated -------------------------------------------

STATES = [
    ("in_trial", 1_700_000_000_456),
    ("active", 1_701_209_650_789),
    ("non_renewing", 1_702_000_000_000),
    ("cancelled", 1_703_801_610_001),
]


@pytest.mark.parametrize(
    "order",
    list(itertools.permutations(range(len(STATES)))),
    ids=lambda order: "".join(map(str, order)),
)
async def test_any_arrival_order_ends_in_the_newest_state(
    sidecar: Running, order: tuple[int, ...]
) -> None:
    for index in order:
        status, version = STATES[index]
        await sidecar.post(_state(status, resource_version=version))

    assert _row(sidecar)[:3] == ("cancelled", "mymodule-pro", 1_703_801_610_001)
    results = dict(sidecar.query("SELECT status, result FROM deliveries"))
    after_newest = order[order.index(len(STATES) - 1) + 1 :]
    assert [results[STATES[index][0]] for index in after_newest] == ["stale"] * len(
        after_newest
    )


async def test_days_late_retry_of_an_older_state_is_stale(sidecar: Running) -> None:
    await sidecar.post(example("envelope-subscription-created.json"), delivery_id="m1")
    await sidecar.post(
        example("envelope-subscription-cancelled.json"), delivery_id="m3"
    )
    sidecar.clock.now += 3 * 86400

    status, answer = await sidecar.post(
        example("envelope-subscription-status-updated.json"), delivery_id="m2"
    )
    _, lookup = await sidecar.get(f"/entitlement/{SHOP}?product=mymodule")

    assert (status, answer["result"]) == (200, "stale")
    assert lookup["status"] == "cancelled"


async def test_stale_state_is_recorded_with_its_own_facts(sidecar: Running) -> None:
    await sidecar.post(_state("cancelled", resource_version=2))

    await sidecar.post(_state("active", resource_version=1), delivery_id="msg_old")

    assert sidecar.query(
        "SELECT result, status, version FROM deliveries WHERE delivery_id = 'msg_old'"
    ) == [("stale", "active", 1)]


async def test_versions_are_kept_per_shop_and_product(sidecar: Running) -> None:
    await sidecar.post(_state("active", resource_version=5))

    other_product = await sidecar.post(
        subscription_event(SHOP, "in_trial", product="other", resource_version=1)
    )
    other_shop = await sidecar.post(
        subscription_event("another-shop", "in_trial", resource_version=1)
    )

    assert other_product[1]["result"] == "applied"
    assert other_shop[1]["result"] == "applied"


# --- draft bodies: versions in seconds ------------------------------------------


def _draft(status: str, updated_at: int) -> dict[str, Any]:
    body = example("draft-subscription_created.json")
    body["subscription"].update(status=status, updated_at=updated_at)
    return body


async def test_two_draft_states_in_the_same_second_keep_the_first(
    sidecar: Running,
) -> None:
    first = await sidecar.post(
        _draft("in_trial", 1_700_000_000), path="/webhooks/subscription_created"
    )
    second = await sidecar.post(
        _draft("active", 1_700_000_000), path="/webhooks/subscription_updated"
    )

    assert [first[1]["result"], second[1]["result"]] == ["applied", "stale"]
    assert _row(sidecar, DRAFT_SHOP)[:3] == (
        "in_trial",
        "mymodule-basic",
        1_700_000_000_000,
    )


async def test_draft_state_one_second_later_is_applied(sidecar: Running) -> None:
    await sidecar.post(
        _draft("in_trial", 1_700_000_000), path="/webhooks/subscription_created"
    )

    status, answer = await sidecar.post(
        _draft("active", 1_700_000_001), path="/webhooks/subscription_updated"
    )

    assert (status, answer["result"]) == (200, "applied")
    assert _row(sidecar, DRAFT_SHOP)[0] == "active"


# --- customer versions ----------------------------------------------------------


async def test_customer_version_is_independent_of_subscription_version(
    sidecar: Running,
) -> None:
    await sidecar.post(_state("active", resource_version=2_000_000_000_000))

    # Older than the subscription, yet the first customer state: applied.
    deleted = await sidecar.post(customer_event(SHOP, True, 1_000_000_000_000))
    # And a subscription older than the customer state is still newer for itself.
    newer_subscription = await sidecar.post(
        _state("cancelled", resource_version=2_000_000_000_001)
    )
    _, lookup = await sidecar.get(f"/entitlement/{SHOP}?product=mymodule")

    assert deleted[1]["result"] == "applied"
    assert newer_subscription[1]["result"] == "applied"
    assert (lookup["status"], lookup["reason"]) == ("cancelled", "customer_deleted")


@pytest.mark.parametrize(
    ("second_version", "result", "deleted"),
    [
        (1_000_000_000_001, "applied", 1),
        (1_000_000_000_000, "stale", 0),
        (999, "stale", 0),
    ],
)
async def test_customer_state_follows_its_own_version(
    sidecar: Running, second_version: int, result: str, deleted: int
) -> None:
    await sidecar.post(customer_event(SHOP, False, 1_000_000_000_000))

    status, answer = await sidecar.post(customer_event(SHOP, True, second_version))

    assert (status, answer["result"]) == (200, result)
    assert sidecar.query("SELECT deleted FROM customers") == [(deleted,)]


async def test_customer_without_resource_version_is_ordered_by_updated_at(
    sidecar: Running,
) -> None:
    older = example("draft-customer_updated.json")
    newer = example("draft-customer_updated.json")
    newer["customer"].update(
        deleted=True, updated_at=older["customer"]["updated_at"] + 1
    )

    first = await sidecar.post(newer, path="/webhooks/customer_updated")
    second = await sidecar.post(older, path="/webhooks/customer_updated")

    assert [first[1]["result"], second[1]["result"]] == ["applied", "stale"]
    assert sidecar.query("SELECT deleted, version FROM customers") == [
        (1, (older["customer"]["updated_at"] + 1) * 1000)
    ]
