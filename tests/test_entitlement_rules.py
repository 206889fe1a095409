"""The entitlement rules, checked on each side of every boundary through HTTP.

Each case stores one subscription through the webhook listener, moves the
server's clock, and reads the verdict from the lookup listener.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from conftest import (
    Running,
    StartSidecar,
    customer_event,
    example,
    subscription_event,
)

SHOP = "shop-rules"
PRODUCT = "mymodule"
END = 1_800_000_000
HOUR = 3600

ANSWER_KEYS = {
    "shop_id",
    "product",
    "entitled",
    "plan",
    "status",
    "in_trial",
    "trial_end",
    "current_term_end",
    "updated_at",
    "reason",
}


async def _store(running: Running, body: dict[str, Any]) -> None:
    status, answer = await running.post(body)
    assert (status, answer["result"]) == (200, "applied")


async def _lookup(
    running: Running, shop_id: str = SHOP, product: str = PRODUCT
) -> dict[str, Any]:
    status, answer = await running.get(f"/entitlement/{shop_id}?product={product}")
    assert status == 200, answer
    return answer


RULES = [
    # status, subscription dates, grace (None: the default), clock, then the
    # expected entitled, reason and in_trial.
    pytest.param("active", {}, None, END, True, "active", False, id="active"),
    pytest.param(
        "active",
        {"current_term_end": END, "trial_end": END},
        None,
        END + 30 * 86400,
        True,
        "active",
        False,
        id="active-long-after-its-dates",
    ),
    pytest.param(
        "in_trial",
        {"trial_end": END},
        None,
        END - 1,
        True,
        "trial",
        True,
        id="in_trial-before-trial-end",
    ),
    pytest.param(
        "in_trial",
        {"trial_end": END},
        None,
        END + HOUR - 1,
        True,
        "trial",
        True,
        id="in_trial-last-second-of-grace",
    ),
    pytest.param(
        "in_trial",
        {"trial_end": END},
        None,
        END + HOUR - 0.001,
        True,
        "trial",
        True,
        id="in_trial-last-millisecond-of-grace",
    ),
    pytest.param(
        "in_trial",
        {"trial_end": END},
        None,
        END + HOUR,
        False,
        "trial_ended",
        False,
        id="in_trial-at-trial-end-plus-grace",
    ),
    pytest.param(
        "in_trial",
        {"trial_end": END},
        60,
        END + 59,
        True,
        "trial",
        True,
        id="in_trial-inside-configured-grace",
    ),
    pytest.param(
        "in_trial",
        {"trial_end": END},
        60,
        END + 60,
        False,
        "trial_ended",
        False,
        id="in_trial-after-configured-grace",
    ),
    pytest.param(
        "in_trial",
        {"trial_end": END},
        0,
        END - 1,
        True,
        "trial",
        True,
        id="in_trial-no-grace-before-end",
    ),
    pytest.param(
        "in_trial",
        {"trial_end": END},
        0,
        END,
        False,
        "trial_ended",
        False,
        id="in_trial-no-grace-at-end",
    ),
    pytest.param(
        "in_trial",
        {"trial_end": END, "current_term_end": END + 10 * HOUR},
        None,
        END + HOUR,
        False,
        "trial_ended",
        False,
        id="in_trial-ends-with-trial-not-term",
    ),
    pytest.param(
        "in_trial",
        {},
        None,
        END + 365 * 86400,
        True,
        "trial",
        True,
        id="in_trial-without-trial-end",
    ),
    pytest.param(
        "non_renewing",
        {"current_term_end": END},
        None,
        END + HOUR - 1,
        True,
        "non_renewing",
        False,
        id="non_renewing-last-second-of-grace",
    ),
    pytest.param(
        "non_renewing",
        {"current_term_end": END},
        None,
        END + HOUR,
        False,
        "term_ended",
        False,
        id="non_renewing-at-term-end-plus-grace",
    ),
    pytest.param(
        "non_renewing",
        {"current_term_end": END},
        60,
        END + 59,
        True,
        "non_renewing",
        False,
        id="non_renewing-inside-configured-grace",
    ),
    pytest.param(
        "non_renewing",
        {"current_term_end": END},
        60,
        END + 60,
        False,
        "term_ended",
        False,
        id="non_renewing-after-configured-grace",
    ),
    pytest.param(
        "non_renewing",
        {"current_term_end": END, "trial_end": END - 30 * 86400},
        None,
        END,
        True,
        "non_renewing",
        False,
        id="non_renewing-ignores-an-old-trial-end",
    ),
    pytest.param(
        "non_renewing",
        {},
        None,
        END + 365 * 86400,
        True,
        "non_renewing",
        False,
        id="non_renewing-without-term-end",
    ),
    pytest.param(
        "future",
        {"trial_end": END + HOUR},
        None,
        END,
        False,
        "future",
        False,
        id="future",
    ),
    pytest.param("paused", {}, None, END, False, "paused", False, id="paused"),
    pytest.param(
        "cancelled",
        {"current_term_end": END + 10 * HOUR},
        None,
        END,
        False,
        "cancelled",
        False,
        id="cancelled-before-its-term-end",
    ),
    pytest.param(
        "canceled", {}, None, END, False, "cancelled", False, id="canceled-spelling"
    ),
    pytest.param(
        "in_dunning", {}, None, END, False, "unknown_status", False, id="unknown"
    ),
]


@pytest.mark.parametrize(
    ("status", "dates", "grace_s", "now", "entitled", "reason", "in_trial"), RULES
)
async def test_entitlement_at_rule_boundary_gives_expected_verdict(
    start_sidecar: StartSidecar,
    status: str,
    dates: dict[str, int],
    grace_s: int | None,
    now: float,
    entitled: bool,
    reason: str,
    in_trial: bool,
) -> None:
    env = {} if grace_s is None else {"SIDECAR_GRACE_SECONDS": str(grace_s)}
    running = await start_sidecar(env=env)
    body = subscription_event(SHOP, status, updated_at=END)
    body["data"]["subscription"].update(dates)
    await _store(running, body)

    running.clock.now = now
    answer = await _lookup(running)

    assert (answer["entitled"], answer["reason"], answer["in_trial"]) == (
        entitled,
        reason,
        in_trial,
    )


async def test_entitlement_of_unknown_status_echoes_the_status(
    sidecar: Running,
) -> None:
    await _store(sidecar, subscription_event(SHOP, "Transferred", updated_at=END))

    answer = await _lookup(sidecar)

    assert (answer["status"], answer["reason"]) == ("transferred", "unknown_status")


async def test_entitlement_in_trial_flag_follows_the_clock_without_new_events(
    sidecar: Running,
) -> None:
    await _store(sidecar, subscription_event(SHOP, "in_trial", trial_end=END))
    seen = []

    for now in (END - HOUR, END, END + HOUR - 1, END + HOUR, END + 2 * HOUR):
        sidecar.clock.now = now
        answer = await _lookup(sidecar)
        seen.append((answer["in_trial"], answer["entitled"], answer["reason"]))

    assert seen == [
        (True, True, "trial"),
        (True, True, "trial"),
        (True, True, "trial"),
        (False, False, "trial_ended"),
        (False, False, "trial_ended"),
    ]


@pytest.mark.parametrize("product", ["mymodule", "othermodule"])
@pytest.mark.parametrize("status", ["active", "in_trial", "non_renewing"])
async def test_entitlement_of_deleted_customer_is_denied_for_every_product(
    sidecar: Running, product: str, status: str
) -> None:
    for module in ("mymodule", "othermodule"):
        body = subscription_event(SHOP, status, module, resource_version=1000)
        await _store(sidecar, body)
    await _store(sidecar, customer_event(SHOP, deleted=True, resource_version=2000))

    answer = await _lookup(sidecar, product=product)

    assert answer["status"] == status
    assert (answer["entitled"], answer["reason"], answer["in_trial"]) == (
        False,
        "customer_deleted",
        False,
    )


async def test_entitlement_of_restored_customer_is_granted_again(
    sidecar: Running,
) -> None:
    await _store(sidecar, subscription_event(SHOP, "active", resource_version=1000))
    await _store(sidecar, customer_event(SHOP, deleted=True, resource_version=2000))
    await _store(sidecar, customer_event(SHOP, deleted=False, resource_version=3000))

    answer = await _lookup(sidecar)

    assert (answer["entitled"], answer["reason"]) == (True, "active")


async def test_entitlement_of_deleted_customer_does_not_touch_other_shops(
    sidecar: Running,
) -> None:
    await _store(sidecar, subscription_event(SHOP, "active", resource_version=1000))
    await _store(sidecar, subscription_event("neighbour", "active"))
    await _store(sidecar, customer_event(SHOP, deleted=True, resource_version=2000))

    answer = await _lookup(sidecar, shop_id="neighbour")

    assert (answer["entitled"], answer["reason"]) == (True, "active")


async def test_answer_for_known_shop_has_the_full_documented_shape(
    sidecar: Running,
) -> None:
    body = example("envelope-subscription-created.json")
    await _store(sidecar, body)
    # The receipt time must not leak into updated_at.
    sidecar.clock.now = 1_700_000_100

    answer = await _lookup(sidecar, shop_id=body["data"]["shopId"])

    assert answer == {
        "shop_id": "3f9c2b7e-51d4-4c1a-9e0b-7a6d2c8e1f43",
        "product": "mymodule",
        "entitled": True,
        "plan": "mymodule-pro",
        "status": "in_trial",
        "in_trial": True,
        "trial_end": 1701209600,
        "current_term_end": 1701209600,
        "updated_at": 1700000000,
        "reason": "trial",
    }
    for key in ("trial_end", "current_term_end", "updated_at"):
        assert type(answer[key]) is int, key
    for key in ("entitled", "in_trial"):
        assert type(answer[key]) is bool, key


async def test_answer_without_dates_or_plan_has_every_key_as_null(
    sidecar: Running,
) -> None:
    await _store(sidecar, subscription_event(SHOP, "active", plan_id=None))

    answer = await _lookup(sidecar)

    assert set(answer) == ANSWER_KEYS
    assert [answer[key] for key in ("plan", "trial_end", "current_term_end")] == [
        None,
        None,
        None,
    ]
    assert answer["updated_at"] is None


async def test_answer_updated_at_is_the_subscriptions_own_in_seconds(
    sidecar: Running,
) -> None:
    sidecar.clock.now = END + 5 * HOUR
    body = subscription_event(
        SHOP, "active", updated_at=END, resource_version=END * 1000 + 789
    )
    await _store(sidecar, body)

    answer = await _lookup(sidecar)

    assert answer["updated_at"] == END


async def test_answer_from_items_catalogue_reports_plan_item_price(
    sidecar: Running,
) -> None:
    body = example("envelope-subscription-updated-items.json")
    await _store(sidecar, body)

    answer = await _lookup(sidecar, shop_id=body["data"]["shopId"])

    assert set(answer) == ANSWER_KEYS
    assert (answer["plan"], answer["status"], answer["reason"]) == (
        "mymodule-pro-EUR-monthly",
        "active",
        "active",
    )
    assert answer["updated_at"] == 1702000000


# The entitlements_readable view repeats the rule in SQL for the sqlite3 shell.
# Both must agree on every case, against the real clock: the view cannot be
# given another, so the dates sit a minute either side of each boundary. The
# grace period is not the default, so the view must read the one in use.
GRACE_S = 600

VIEW_CASES = [
    ("active", None, None, False),
    ("in_trial", None, None, False),
    ("in_trial", -GRACE_S + 60, None, False),
    ("in_trial", -GRACE_S - 60, None, False),
    ("non_renewing", None, None, False),
    ("non_renewing", None, -GRACE_S + 60, False),
    ("non_renewing", None, -GRACE_S - 60, False),
    ("future", None, None, False),
    ("paused", None, None, False),
    ("cancelled", None, None, False),
    ("something_new", None, None, False),
    ("active", None, None, True),
    ("in_trial", 86400, None, True),
]


async def test_readable_view_gives_the_same_verdict_as_lookups(
    start_sidecar: StartSidecar,
) -> None:
    sidecar = await start_sidecar({"SIDECAR_GRACE_SECONDS": str(GRACE_S)})
    now = int(time.time())
    sidecar.clock.now = now
    for number, (status, trial_in, term_in, deleted) in enumerate(VIEW_CASES):
        shop = f"view-{number}"
        fields: dict[str, Any] = {"resource_version": 1000}
        if trial_in is not None:
            fields["trial_end"] = now + trial_in
        if term_in is not None:
            fields["current_term_end"] = now + term_in
        await sidecar.post(subscription_event(shop, status, **fields))
        if deleted:
            await sidecar.post(customer_event(shop, True, 1000))

    expected = []
    for number in range(len(VIEW_CASES)):
        _, answer = await sidecar.get(f"/entitlement/view-{number}?product=mymodule")
        expected.append((f"view-{number}", int(answer["entitled"]), answer["reason"]))
    in_view = sidecar.query(
        "SELECT shop_id, entitled, reason FROM entitlements_readable"
        " ORDER BY CAST(substr(shop_id, 6) AS INTEGER)"
    )

    assert in_view == expected
    # Every reason the rule can give for a stored shop is covered.
    assert {reason for _, _, reason in expected} >= {
        "active",
        "trial",
        "trial_ended",
        "non_renewing",
        "term_ended",
        "future",
        "paused",
        "cancelled",
        "unknown_status",
        "customer_deleted",
    }
