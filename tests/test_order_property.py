"""The final tables do not depend on the order deliveries arrive in.

Chargebee gives every state of a subscription (and of a customer) its own
version, so whatever order Billing's retries produce, the newest version must
win. Generated per-shop histories are delivered in order to one sidecar and in
a random permutation to another; both must end with the tables the histories
imply.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Running, StartSidecar

# Run these alone with `pytest -m reliability`.
pytestmark = pytest.mark.reliability

BASE_SECOND = 1_700_000_000
PRODUCTS = ("mod-a", "mod-b")
SUBSCRIPTION_EVENT_NAMES = (
    "subscription.created",
    "subscription.updated",
    "subscription_status_updated",
    "Subscription.Canceled",
    "payment.succeeded",
    "payment-failed",
)

STATUSES = ("active", "in_trial", "non_renewing", "cancelled", "paused", "future")

_example_numbers = itertools.count()


@dataclass(frozen=True)
class SubscriptionState:
    shop_id: str
    product: str
    status: str
    plan: str
    trial_end: int | None
    current_term_end: int | None
    updated_at: int
    version: int
    dialect: str  # 'envelope', 'envelope-items', 'envelope-no-version' or 'draft'

    def row(self) -> tuple[Any, ...]:
        return (
            self.plan,
            self.status,
            self.trial_end,
            self.current_term_end,
            self.updated_at,
            self.version,
        )


@dataclass(frozen=True)
class CustomerState:
    shop_id: str
    deleted: bool
    version: int
    dialect: str  # 'envelope', 'envelope-no-version' or 'draft'


@dataclass(frozen=True)
class Delivery:
    delivery_id: str
    path: str
    body: bytes
    # What in-order delivery must answer: 'applied', 'stale' or 'duplicate'.
    in_order_result: str


def _subscription_body(state: SubscriptionState, event_name: str) -> tuple[str, Any]:
    subscription: dict[str, Any] = {
        "id": f"sub-{state.shop_id}-{state.product}",
        "status": state.status,
        "updated_at": state.updated_at,
        "meta_data": {"module": state.product},
    }
    for field in ("trial_end", "current_term_end"):
        if getattr(state, field) is not None:
            subscription[field] = getattr(state, field)

    if state.dialect == "draft":
        subscription["items"] = [{"type": "plan", "item_id": state.plan}]
        body = {"customer": {"ps_shop_id": state.shop_id}, "subscription": subscription}
        return "/webhooks/" + event_name, body

    if state.dialect == "envelope-items":
        subscription["subscription_items"] = [
            {"item_type": "addon", "item_price_id": "support-EUR"},
            {"item_type": "plan", "item_price_id": state.plan},
        ]
    else:
        subscription["plan_id"] = state.plan
    if state.dialect != "envelope-no-version":
        subscription["resource_version"] = state.version
    # A customer object inside a subscription event must not touch customer state.
    customer = {"cf_shop_id": state.shop_id, "deleted": state.version % 2 == 0}
    data = {"shopId": state.shop_id, "customer": customer, "subscription": subscription}
    return "/webhooks", {"eventType": event_name, "data": data}


def _customer_body(state: CustomerState) -> tuple[str, Any]:
    seconds = state.version // 1000
    if state.dialect == "draft":
        customer = {
            "ps_shop_id": state.shop_id,
            "deleted": state.deleted,
            "updated_at": seconds,
        }
        return "/webhooks/customer_updated", {"customer": customer}
    customer_fields: dict[str, Any] = {"deleted": state.deleted, "updated_at": seconds}
    if state.dialect == "envelope":
        customer_fields["resource_version"] = state.version
    data = {"shopId": state.shop_id, "customer": customer_fields}
    return "/webhooks", {"eventType": "customer.updated", "data": data}


@st.composite
def _versions(draw: st.DrawFn, count: int, whole_seconds: list[bool]) -> list[int]:
    """Distinct increasing versions in ms; whole seconds where only updated_at is."""
    seconds = sorted(
        draw(
            st.lists(
                st.integers(0, 100_000), min_size=count, max_size=count, unique=True
            )
        )
    )
    return [
        (BASE_SECOND + second) * 1000 + (0 if whole else draw(st.integers(0, 999)))
        for second, whole in zip(seconds, whole_seconds, strict=True)
    ]


@st.composite
def _subscription_history(
    draw: st.DrawFn, shop_id: str, product: str
) -> list[SubscriptionState]:
    dialects = draw(
        st.lists(
            st.sampled_from(
                ("envelope", "envelope-items", "envelope-no-version", "draft")
            ),
            min_size=1,
            max_size=4,
        )
    )
    versions = draw(
        _versions(len(dialects), [dialect != "envelope" for dialect in dialects])
    )
    end = st.none() | st.integers(BASE_SECOND, BASE_SECOND + 10**7)
    return [
        SubscriptionState(
            shop_id=shop_id,
            product=product,
            status=draw(st.sampled_from(STATUSES)),
            plan=draw(st.sampled_from(("plan-basic", "plan-pro"))),
            trial_end=draw(end),
            current_term_end=draw(end),
            updated_at=version // 1000,
            version=version,
            dialect=dialect,
        )
        for dialect, version in zip(dialects, versions, strict=True)
    ]


@st.composite
def _customer_history(draw: st.DrawFn, shop_id: str) -> list[CustomerState]:
    dialects = draw(
        st.lists(
            st.sampled_from(("envelope", "envelope-no-version", "draft")), max_size=3
        )
    )
    versions = draw(
        _versions(len(dialects), [dialect != "envelope" for dialect in dialects])
    )
    return [
        CustomerState(shop_id, draw(st.booleans()), version, dialect)
        for dialect, version in zip(dialects, versions, strict=True)
    ]


@dataclass(frozen=True)
class Histories:
    subscriptions: list[SubscriptionState]
    customers: list[CustomerState]
    deliveries: list[Delivery]


@st.composite
def _histories(draw: st.DrawFn) -> Histories:
    """Histories of 1 to 3 shops, as an in-order list of deliveries."""
    prefix = f"e{next(_example_numbers)}"
    subscriptions: list[SubscriptionState] = []
    customers: list[CustomerState] = []
    for shop_number in range(draw(st.integers(1, 3))):
        shop_id = f"{prefix}-shop-{shop_number}"
        for product in draw(
            st.lists(st.sampled_from(PRODUCTS), min_size=1, max_size=2, unique=True)
        ):
            subscriptions += draw(_subscription_history(shop_id, product))
        customers += draw(_customer_history(shop_id))

    deliveries: list[Delivery] = []
    ids = (f"{prefix}-msg-{n}" for n in itertools.count())
    for state in subscriptions:
        path, body = _subscription_body(
            state, draw(st.sampled_from(SUBSCRIPTION_EVENT_NAMES))
        )
        deliveries += _with_retries(draw, next(ids), path, body)
        if draw(st.booleans()):
            # The same state again under a new id, possibly as another event.
            path, body = _subscription_body(
                state, draw(st.sampled_from(SUBSCRIPTION_EVENT_NAMES))
            )
            deliveries += _with_retries(draw, next(ids), path, body, result="stale")
    for customer in customers:
        path, body = _customer_body(customer)
        deliveries += _with_retries(draw, next(ids), path, body)
    return Histories(subscriptions, customers, deliveries)


def _with_retries(
    draw: st.DrawFn,
    delivery_id: str,
    path: str,
    body: Any,
    result: str = "applied",
) -> list[Delivery]:
    raw = json.dumps(body).encode()
    first = Delivery(delivery_id, path, raw, result)
    repeats = draw(st.integers(0, 2))
    return [first] + [Delivery(delivery_id, path, raw, "duplicate")] * repeats


async def _deliver(sidecar: Running, delivery: Delivery) -> str:
    status, answer = await sidecar.post(
        delivery.body, path=delivery.path, delivery_id=delivery.delivery_id
    )
    assert status == 200, (delivery, answer)
    return str(answer["result"])


def _tables(sidecar: Running, prefix: str) -> dict[str, set[tuple[Any, ...]]]:
    # delivery_id is left out: which of two deliveries of one state was stored
    # first is the one thing that may differ.
    pattern = prefix + "-%"
    return {
        "entitlements": set(
            sidecar.query(
                "SELECT shop_id, product, plan, status, trial_end, current_term_end,"
                " updated_at, version, customer_deleted FROM entitlements"
                " WHERE shop_id LIKE ?",
                pattern,
            )
        ),
        "customers": set(
            sidecar.query(
                "SELECT shop_id, deleted, version FROM customers WHERE shop_id LIKE ?",
                pattern,
            )
        ),
    }


def _expected_tables(histories: Histories) -> dict[str, set[tuple[Any, ...]]]:
    newest: dict[tuple[str, str], SubscriptionState] = {}
    for state in histories.subscriptions:
        key = (state.shop_id, state.product)
        if key not in newest or state.version > newest[key].version:
            newest[key] = state
    newest_customer: dict[str, CustomerState] = {}
    for customer in histories.customers:
        known = newest_customer.get(customer.shop_id)
        if known is None or customer.version > known.version:
            newest_customer[customer.shop_id] = customer
    # Each entitlement row carries its shop's newest customer flag, whichever
    # of the two arrived first.
    deleted = {
        shop_id: int(customer.deleted) for shop_id, customer in newest_customer.items()
    }
    return {
        "entitlements": {
            (*key, *state.row(), deleted.get(key[0], 0))
            for key, state in newest.items()
        },
        "customers": {
            (shop_id, int(customer.deleted), customer.version)
            for shop_id, customer in newest_customer.items()
        },
    }


@pytest.fixture
async def two_sidecars(start_sidecar: StartSidecar) -> tuple[Running, Running]:
    """One sidecar for in-order delivery, one for the permutations."""
    return await start_sidecar(), await start_sidecar()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(histories=_histories(), data=st.data())
async def test_final_tables_with_deliveries_in_any_order_match_in_order_delivery(
    two_sidecars: tuple[Running, Running], histories: Histories, data: st.DataObject
) -> None:
    in_order, shuffled = two_sidecars
    prefix = histories.deliveries[0].delivery_id.split("-")[0]

    for delivery in histories.deliveries:
        assert await _deliver(in_order, delivery) == delivery.in_order_result

    permutation = data.draw(st.permutations(histories.deliveries))
    batch_size = data.draw(st.integers(1, 5), label="deliveries sent concurrently")
    for start in range(0, len(permutation), batch_size):
        batch = permutation[start : start + batch_size]
        await asyncio.gather(*(_deliver(shuffled, delivery) for delivery in batch))

    expected = _expected_tables(histories)
    assert _tables(in_order, prefix) == expected
    assert _tables(shuffled, prefix) == expected
