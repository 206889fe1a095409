"""Both body dialects, as PrestaShop Billing sends them, through the real listener."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from conftest import EVENTS_DIR, Running, StartSidecar, example

Body = dict[str, Any]

SHOP = "3f9c2b7e-51d4-4c1a-9e0b-7a6d2c8e1f43"
DRAFT_SHOP = "8d0e6a52-93b1-4f0e-b2c4-5b7f1e2a9c60"
DOCS_SHOP = "d673f3d0-86b1-4193-a714-dc9c487ec767"
DOCS_CUSTOMER_SHOP = "b2581e4b-0030-4fc8-9bf2-7f01c550a946"


def _stored(sidecar: Running) -> dict[str, list[tuple[Any, ...]]]:
    return {
        table: sidecar.query(f"SELECT * FROM {table} ORDER BY 1")
        for table in ("deliveries", "entitlements", "customers")
    }


def _entitlement(sidecar: Running, shop_id: str, product: str) -> tuple[Any, ...]:
    rows = sidecar.query(
        "SELECT plan, status, trial_end, current_term_end, updated_at"
        " FROM entitlements WHERE shop_id = ? AND product = ?",
        shop_id,
        product,
    )
    assert len(rows) == 1, f"expected one row for {shop_id}/{product}, got {rows}"
    return rows[0]


def _subscription(**fields: Any) -> Body:
    return {
        "id": "16BkPqT2xY9",
        "plan_id": "mymodule-pro",
        "status": "active",
        "updated_at": 1701209650,
        "resource_version": 1701209650789,
        "meta_data": {"module": "mymodule"},
        **fields,
    }


def _envelope(event_type: str = "subscription.updated", **data: Any) -> Body:
    return {
        "eventType": event_type,
        "data": {"shopId": SHOP, "subscription": _subscription(), **data},
    }


# --- every example body -----------------------------------------------------

# file, path, shop, product, (plan, status, trial_end, current_term_end, updated_at)
SUBSCRIPTION_EXAMPLES = [
    (
        "envelope-subscription-created.json",
        "/webhooks",
        SHOP,
        "mymodule",
        ("mymodule-pro", "in_trial", 1701209600, 1701209600, 1700000000),
    ),
    (
        "envelope-subscription-status-updated.json",
        "/webhooks",
        SHOP,
        "mymodule",
        ("mymodule-pro", "active", 1701209600, 1703801600, 1701209650),
    ),
    (
        "envelope-subscription-cancelled.json",
        "/webhooks",
        SHOP,
        "mymodule",
        ("mymodule-pro", "cancelled", 1701209600, 1703801600, 1703801610),
    ),
    (
        "envelope-subscription-updated-items.json",
        "/webhooks",
        "b71e0c9a-2f64-4d3b-8a15-c0d9e4f26a77",
        "mymodule",
        ("mymodule-pro-EUR-monthly", "active", 1701209600, 1703801600, 1702000000),
    ),
    (
        "envelope-payment-failed.json",
        "/webhooks",
        SHOP,
        "mymodule",
        ("mymodule-pro", "active", 1701209600, 1703801600, 1701209650),
    ),
    (
        "draft-subscription_created.json",
        "/webhooks/subscription_created",
        DRAFT_SHOP,
        "default",
        ("mymodule-basic", "in_trial", 1701209600, None, 1700000000),
    ),
    (
        "prestashop-docs/subscription_created.json",
        "/webhooks",
        DOCS_SHOP,
        "rbm-example",
        ("default-free", "active", 1635980400, 1639004399, 1636467088),
    ),
    (
        "prestashop-docs/payment_failed.json",
        "/webhooks",
        DOCS_CUSTOMER_SHOP,
        "rbm-example",
        ("default-free", "active", 1635980400, 1639004399, 1636467088),
    ),
]

# file, path, shop
CUSTOMER_EXAMPLES = [
    ("envelope-customer-updated.json", "/webhooks", SHOP),
    ("draft-customer_updated.json", "/webhooks/customer_updated", DRAFT_SHOP),
    ("prestashop-docs/customer_updated.json", "/webhooks", DOCS_CUSTOMER_SHOP),
    (
        "prestashop-docs/customer-billing-address_updated.json",
        "/webhooks",
        DOCS_CUSTOMER_SHOP,
    ),
]


def _load(relative: str) -> bytes:
    return (EVENTS_DIR / relative).read_bytes()


def test_example_tables_cover_every_example_file() -> None:
    on_disk = {str(path.relative_to(EVENTS_DIR)) for path in EVENTS_DIR.rglob("*.json")}
    covered = {case[0] for case in SUBSCRIPTION_EXAMPLES + CUSTOMER_EXAMPLES}
    assert on_disk == covered


@pytest.mark.parametrize(
    ("name", "path", "shop_id", "product", "row"),
    SUBSCRIPTION_EXAMPLES,
    ids=[case[0] for case in SUBSCRIPTION_EXAMPLES],
)
async def test_subscription_example_is_applied_to_its_shop_and_product(
    start_sidecar: StartSidecar,
    name: str,
    path: str,
    shop_id: str,
    product: str,
    row: tuple[Any, ...],
) -> None:
    sidecar = await start_sidecar()

    status, answer = await sidecar.post(_load(name), path=path)

    assert (status, answer["result"]) == (200, "applied")
    assert _entitlement(sidecar, shop_id, product) == row
    assert sidecar.query("SELECT count(*) FROM entitlements") == [(1,)]
    assert sidecar.query("SELECT * FROM customers") == []


@pytest.mark.parametrize(
    ("name", "path", "shop_id"),
    CUSTOMER_EXAMPLES,
    ids=[case[0] for case in CUSTOMER_EXAMPLES],
)
async def test_customer_example_is_applied_to_customer_state_only(
    start_sidecar: StartSidecar, name: str, path: str, shop_id: str
) -> None:
    sidecar = await start_sidecar()

    status, answer = await sidecar.post(_load(name), path=path)

    assert (status, answer["result"]) == (200, "applied")
    assert sidecar.query("SELECT shop_id, deleted FROM customers") == [(shop_id, 0)]
    assert sidecar.query("SELECT * FROM entitlements") == []


# --- event type and its spelling ---------------------------------------------


async def test_draft_type_from_top_level_field_is_used(
    start_sidecar: StartSidecar,
) -> None:
    sidecar = await start_sidecar()
    body = example("draft-subscription_created.json")
    body["event_type"] = "subscription_created"

    status, answer = await sidecar.post(body)

    assert (status, answer["result"]) == (200, "applied")
    assert sidecar.query("SELECT event_type FROM deliveries") == [
        ("subscription.created",)
    ]


async def test_draft_without_type_in_url_or_body_is_rejected(
    start_sidecar: StartSidecar,
) -> None:
    sidecar = await start_sidecar()

    status, _ = await sidecar.post(example("draft-subscription_created.json"))

    assert status == 422
    assert sidecar.query("SELECT * FROM entitlements") == []


@pytest.mark.parametrize(
    ("sent", "canonical"),
    [
        ("subscription.created", "subscription.created"),
        ("SUBSCRIPTION.CREATED", "subscription.created"),
        ("subscription_created", "subscription.created"),
        ("Subscription-Updated", "subscription.updated"),
        ("subscription.status-updated", "subscription.status-updated"),
        ("subscription_status_updated", "subscription.status-updated"),
        ("Subscription.Status.Updated", "subscription.status-updated"),
        ("subscription.cancelled", "subscription.cancelled"),
        ("subscription.canceled", "subscription.cancelled"),
        ("SUBSCRIPTION_CANCELED", "subscription.cancelled"),
        ("payment-succeeded", "payment.succeeded"),
        ("PAYMENT_FAILED", "payment.failed"),
    ],
)
async def test_subscription_event_name_in_any_spelling_is_applied(
    start_sidecar: StartSidecar, sent: str, canonical: str
) -> None:
    sidecar = await start_sidecar()

    status, answer = await sidecar.post(_envelope(sent))

    assert (status, answer["result"]) == (200, "applied")
    assert sidecar.query("SELECT event_type FROM deliveries") == [(canonical,)]


@pytest.mark.parametrize(
    ("sent", "canonical"),
    [
        ("customer.created", "customer.created"),
        ("Customer_Updated", "customer.updated"),
        ("customer-billing-address.updated", "customer-billing-address.updated"),
        ("customer_billing_address_updated", "customer-billing-address.updated"),
        ("CUSTOMER.BILLING.ADDRESS-UPDATED", "customer-billing-address.updated"),
    ],
)
async def test_customer_event_name_in_any_spelling_is_applied(
    start_sidecar: StartSidecar, sent: str, canonical: str
) -> None:
    sidecar = await start_sidecar()
    body = example("envelope-customer-updated.json")
    body["eventType"] = sent

    status, answer = await sidecar.post(body)

    assert (status, answer["result"]) == (200, "applied")
    assert sidecar.query("SELECT event_type, kind FROM deliveries") == [
        (canonical, "customer")
    ]


@pytest.mark.parametrize(
    "url_type", ["subscription_created", "Subscription.Created", "subscription-created"]
)
async def test_draft_type_in_url_in_any_spelling_is_applied(
    start_sidecar: StartSidecar, url_type: str
) -> None:
    sidecar = await start_sidecar()

    status, answer = await sidecar.post(
        example("draft-subscription_created.json"), path=f"/webhooks/{url_type}"
    )

    assert (status, answer["result"]) == (200, "applied")
    assert sidecar.query("SELECT event_type FROM deliveries") == [
        ("subscription.created",)
    ]


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"eventType": "invoice.generated", "data": {}}, "/webhooks"),
        ({"eventType": "Invoice_Generated", "data": {"shopId": SHOP}}, "/webhooks"),
        (
            {"eventType": "subscription.renewed", "data": {"shopId": "no/shop"}},
            "/webhooks",
        ),
        ({"eventType": "credit_note.created", "data": "not an object"}, "/webhooks"),
        ({}, "/webhooks/invoice_generated"),
        ({"event_type": "order.created", "customer": {}}, "/webhooks"),
    ],
)
async def test_unknown_event_type_is_ignored_even_without_shop_id(
    start_sidecar: StartSidecar, body: Body, path: str
) -> None:
    sidecar = await start_sidecar()

    status, answer = await sidecar.post(body, path=path)

    assert (status, answer["result"]) == (200, "ignored")
    assert sidecar.query("SELECT kind, result, shop_id FROM deliveries") == [
        ("ignored", "ignored", None)
    ]
    assert sidecar.query("SELECT * FROM entitlements") == []
    assert sidecar.query("SELECT * FROM customers") == []


# --- plan, trial end, product -------------------------------------------------


@pytest.mark.parametrize(
    ("subscription", "plan"),
    [
        ({"plan_id": "flat-plan"}, "flat-plan"),
        (
            {
                "plan_id": None,
                "subscription_items": [
                    {"item_price_id": "addon-EUR", "item_type": "addon"},
                    {"item_price_id": "pro-EUR-monthly", "item_type": "plan"},
                ],
            },
            "pro-EUR-monthly",
        ),
        (
            {
                "plan_id": None,
                "subscription_items": [{"item_id": "pro", "item_type": "plan"}],
            },
            "pro",
        ),
        (
            {"plan_id": None, "items": [{"item_id": "basic", "type": "plan"}]},
            "basic",
        ),
        (
            {
                "plan_id": None,
                "items": [{"item_price_id": "x-EUR", "item_type": "plan"}],
            },
            "x-EUR",
        ),
        (
            {
                "plan_id": "catalogue-v1",
                "subscription_items": [{"item_price_id": "v2", "item_type": "plan"}],
            },
            "catalogue-v1",
        ),
        ({"plan_id": None, "items": [{"item_id": "extra", "type": "addon"}]}, None),
    ],
    ids=[
        "plan_id",
        "subscription_items",
        "subscription_items-item_id",
        "items-type",
        "items-item_type",
        "plan_id-first",
        "no-plan-entry",
    ],
)
async def test_plan_is_read_from_either_catalogue_version(
    start_sidecar: StartSidecar, subscription: Body, plan: str | None
) -> None:
    sidecar = await start_sidecar()
    body = _envelope()
    body["data"]["subscription"].update(subscription)

    status, _ = await sidecar.post(body)

    assert status == 200
    assert _entitlement(sidecar, SHOP, "mymodule")[0] == plan


@pytest.mark.parametrize(
    ("subscription", "trial_end"),
    [
        (
            {"status": "in_trial", "trial_end": 1800000000},
            1800000000,
        ),
        (
            {
                "status": "in_trial",
                "subscription_items": [
                    {"item_price_id": "p", "item_type": "plan", "trial_end": 1800000100}
                ],
            },
            1800000100,
        ),
        (
            {
                "status": "in_trial",
                "trial_end": 1800000000,
                "subscription_items": [
                    {"item_price_id": "p", "item_type": "plan", "trial_end": 1800000100}
                ],
            },
            1800000000,
        ),
    ],
    ids=["on-subscription", "on-plan-entry", "subscription-first"],
)
async def test_trial_end_is_read_from_subscription_or_plan_entry(
    start_sidecar: StartSidecar, subscription: Body, trial_end: int
) -> None:
    sidecar = await start_sidecar()
    body = _envelope()
    body["data"]["subscription"].update(subscription)

    await sidecar.post(body)
    status, answer = await sidecar.get(f"/entitlement/{SHOP}?product=mymodule")

    assert status == 200
    assert (answer["status"], answer["trial_end"]) == ("in_trial", trial_end)


async def test_draft_trial_on_plan_entry_is_entitled_until_it_ends(
    start_sidecar: StartSidecar,
) -> None:
    sidecar = await start_sidecar()
    sidecar.clock.now = 1701209600 - 60

    await sidecar.post(
        example("draft-subscription_created.json"),
        path="/webhooks/subscription_created",
    )
    status, answer = await sidecar.get(f"/entitlement/{DRAFT_SHOP}")

    assert status == 200
    assert answer["entitled"] is True
    assert (answer["reason"], answer["trial_end"]) == ("trial", 1701209600)


@pytest.mark.parametrize(
    ("meta_data", "module_id", "product"),
    [
        ({"module": "from-meta"}, "from-data", "from-meta"),
        (None, "from-data", "from-data"),
        ({"shop_url": "https://shop.example"}, "from-data", "from-data"),
        (None, None, "configured"),
    ],
    ids=["meta_data.module", "data.module_id", "meta-without-module", "default"],
)
async def test_product_is_meta_module_then_module_id_then_default(
    start_sidecar: StartSidecar,
    meta_data: Body | None,
    module_id: str | None,
    product: str,
) -> None:
    sidecar = await start_sidecar(product="configured")
    body = _envelope()
    body["data"]["subscription"]["meta_data"] = meta_data
    if module_id is not None:
        body["data"]["module_id"] = module_id

    status, _ = await sidecar.post(body)

    assert status == 200
    assert sidecar.query("SELECT shop_id, product FROM entitlements") == [
        (SHOP, product)
    ]


async def test_same_shop_keeps_one_row_per_product(
    start_sidecar: StartSidecar,
) -> None:
    sidecar = await start_sidecar()
    first = _envelope()
    second = _envelope()
    second["data"]["subscription"]["meta_data"] = {"module": "othermodule"}
    second["data"]["subscription"]["status"] = "cancelled"

    await sidecar.post(first)
    await sidecar.post(second)

    assert sidecar.query(
        "SELECT product, status FROM entitlements ORDER BY product"
    ) == [("mymodule", "active"), ("othermodule", "cancelled")]


# --- shop id ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "shop_id"),
    [
        ({"shopId": "a", "customer": {"cf_shop_id": "b", "ps_shop_id": "c"}}, "a"),
        ({"customer": {"cf_shop_id": "b", "ps_shop_id": "c"}}, "b"),
        ({"customer": {"ps_shop_id": "c"}}, "c"),
        ({"shopId": None, "customer": {"cf_shop_id": "b"}}, "b"),
        ({"shopId": 42}, "42"),
    ],
    ids=["shopId", "cf_shop_id", "ps_shop_id", "null-shopId", "numeric"],
)
async def test_envelope_shop_id_follows_precedence(
    start_sidecar: StartSidecar, data: Body, shop_id: str
) -> None:
    sidecar = await start_sidecar()
    body = {
        "eventType": "subscription.updated",
        "data": {**data, "subscription": _subscription()},
    }

    status, _ = await sidecar.post(body)

    assert status == 200
    assert sidecar.query("SELECT shop_id FROM entitlements") == [(shop_id,)]


async def test_docs_subscription_created_uses_shop_id_over_customer_field(
    start_sidecar: StartSidecar,
) -> None:
    sidecar = await start_sidecar()
    body = example("subscription_created.json")
    assert body["data"]["shopId"] != body["data"]["customer"]["cf_shop_id"]

    await sidecar.post(body)

    found, _ = await sidecar.get(f"/entitlement/{DOCS_SHOP}?product=rbm-example")
    missing, _ = await sidecar.get(
        f"/entitlement/{DOCS_CUSTOMER_SHOP}?product=rbm-example"
    )
    assert (found, missing) == (200, 404)


async def test_draft_shop_id_is_customer_ps_shop_id(
    start_sidecar: StartSidecar,
) -> None:
    sidecar = await start_sidecar()
    body = example("draft-subscription_created.json")
    body["customer"]["cf_shop_id"] = "not-this-one"

    await sidecar.post(body, path="/webhooks/subscription_created")

    assert sidecar.query("SELECT shop_id FROM entitlements") == [(DRAFT_SHOP,)]


# --- payment and customer events ----------------------------------------------


@pytest.mark.parametrize("event_type", ["payment.succeeded", "payment.failed"])
async def test_payment_event_is_applied_like_subscription_updated(
    start_sidecar: StartSidecar, event_type: str
) -> None:
    sidecar = await start_sidecar()
    created = example("envelope-subscription-created.json")
    payment = _envelope(event_type)
    payment["data"]["subscription"]["status"] = "non_renewing"

    await sidecar.post(created)
    status, answer = await sidecar.post(payment)

    assert (status, answer["result"]) == (200, "applied")
    assert _entitlement(sidecar, SHOP, "mymodule")[:2] == (
        "mymodule-pro",
        "non_renewing",
    )


async def test_payment_event_older_than_stored_state_is_stale(
    start_sidecar: StartSidecar,
) -> None:
    sidecar = await start_sidecar()
    await sidecar.post(example("envelope-subscription-cancelled.json"))

    status, answer = await sidecar.post(example("envelope-payment-failed.json"))

    assert (status, answer["result"]) == (200, "stale")
    assert _entitlement(sidecar, SHOP, "mymodule")[1] == "cancelled"


@pytest.mark.parametrize("product", ["mymodule", "othermodule"])
async def test_deleted_customer_is_denied_for_every_product(
    start_sidecar: StartSidecar, product: str
) -> None:
    sidecar = await start_sidecar()
    subscription = _envelope()
    subscription["data"]["subscription"]["meta_data"] = {"module": product}
    deleted = example("envelope-customer-updated.json")
    deleted["data"]["customer"]["deleted"] = True

    await sidecar.post(subscription)
    before = await sidecar.get(f"/entitlement/{SHOP}?product={product}")
    status, answer = await sidecar.post(deleted)
    after = await sidecar.get(f"/entitlement/{SHOP}?product={product}")

    assert (status, answer["result"]) == (200, "applied")
    assert before[1]["entitled"] is True
    assert after[0] == 200
    assert (after[1]["entitled"], after[1]["reason"]) == (False, "customer_deleted")
    assert _entitlement(sidecar, SHOP, product)[1] == "active"


async def test_customer_deleted_later_restored_is_entitled_again(
    start_sidecar: StartSidecar,
) -> None:
    sidecar = await start_sidecar()
    deleted = example("envelope-customer-updated.json")
    deleted["data"]["customer"]["deleted"] = True
    restored = copy.deepcopy(deleted)
    restored["data"]["customer"]["deleted"] = False
    restored["data"]["customer"]["resource_version"] += 1

    await sidecar.post(_envelope())
    await sidecar.post(deleted)
    await sidecar.post(restored)
    _, answer = await sidecar.get(f"/entitlement/{SHOP}?product=mymodule")

    assert (answer["entitled"], answer["reason"]) == (True, "active")


async def test_shop_known_only_from_customer_events_is_unknown(
    start_sidecar: StartSidecar,
) -> None:
    sidecar = await start_sidecar()
    await sidecar.post(example("envelope-customer-updated.json"))

    status, answer = await sidecar.get(f"/entitlement/{SHOP}?product=mymodule")

    assert status == 404
    assert answer["reason"] == "unknown_shop"
    assert sidecar.query("SELECT shop_id FROM customers") == [(SHOP,)]


async def test_subscription_event_does_not_change_customer_state(
    start_sidecar: StartSidecar,
) -> None:
    sidecar = await start_sidecar()
    body = example("envelope-subscription-created.json")
    body["data"]["customer"]["deleted"] = True

    await sidecar.post(body)
    _, answer = await sidecar.get(f"/entitlement/{SHOP}?product=mymodule")

    assert sidecar.query("SELECT * FROM customers") == []
    assert answer["reason"] != "customer_deleted"


@pytest.mark.parametrize(
    "body",
    [
        {"eventType": "customer.updated", "data": {"shopId": SHOP}},
        {"eventType": "customer.created", "data": {"shopId": SHOP, "customer": None}},
    ],
    ids=["envelope-no-customer", "envelope-null-customer"],
)
async def test_customer_event_without_customer_is_rejected(
    start_sidecar: StartSidecar, body: Body
) -> None:
    sidecar = await start_sidecar()

    status, _ = await sidecar.post(body)

    assert status == 422
    assert sidecar.query("SELECT * FROM customers") == []


# --- what the body may contain ----------------------------------------------


@pytest.mark.parametrize("zip_code", [59000, "59000", "SW1A 1AA", None])
async def test_zip_code_of_any_type_is_accepted(
    start_sidecar: StartSidecar, zip_code: Any
) -> None:
    sidecar = await start_sidecar()
    body = example("draft-subscription_created.json")
    body["customer"]["billing_address"]["zip"] = zip_code

    status, answer = await sidecar.post(body, path="/webhooks/subscription_created")

    assert (status, answer["result"]) == (200, "applied")


async def test_unknown_fields_of_any_shape_are_ignored(
    start_sidecar: StartSidecar,
) -> None:
    sidecar = await start_sidecar()
    body = example("envelope-subscription-created.json")
    body["specVersion"] = [1, {"x": None}]
    body["data"]["shopId_typo"] = {"nested": [1.5, "two", None, True]}
    body["data"]["subscription"]["plan_unit_price"] = "free"
    body["data"]["subscription"]["brand_new_field"] = {"deep": {"deeper": [[[]]]}}
    body["data"]["customer"]["billing_address"] = "one line address"
    raw = json.dumps(body).replace('"free"', "1e400").encode()

    status, answer = await sidecar.post(raw)

    assert (status, answer["result"]) == (200, "applied")
    assert _entitlement(sidecar, SHOP, "mymodule")[:2] == ("mymodule-pro", "in_trial")


async def test_unknown_field_deep_under_recursion_limit_is_ignored(
    start_sidecar: StartSidecar,
) -> None:
    sidecar = await start_sidecar()
    raw = json.dumps(_envelope()).encode()
    nested = b'{"extra": ' + b"[" * 200 + b"]" * 200 + b", "
    raw = raw.replace(b'{"shopId"', nested + b'"shopId"', 1)

    status, answer = await sidecar.post(raw)

    assert (status, answer["result"]) == (200, "applied")


@pytest.mark.parametrize(
    "body",
    [
        {"eventType": "subscription.created", "data": {"shopId": SHOP}},
        {
            "eventType": "payment.succeeded",
            "data": {"shopId": SHOP, "subscription": None},
        },
        {"customer": {"ps_shop_id": DRAFT_SHOP}, "event_type": "subscription_updated"},
    ],
    ids=["envelope", "payment-null", "draft"],
)
async def test_subscription_event_without_subscription_is_rejected(
    start_sidecar: StartSidecar, body: Body
) -> None:
    sidecar = await start_sidecar()

    status, answer = await sidecar.post(body)

    assert status == 422
    assert "subscription" in answer["error"]
    assert sidecar.query("SELECT status FROM quarantine") == [(422,)]


@pytest.mark.parametrize(
    "body",
    [
        {
            "eventType": "subscription.updated",
            "data": {"subscription": _subscription()},
        },
        {"event_type": "subscription_created", "subscription": _subscription()},
        {
            "event_type": "customer.updated",
            "customer": {"cf_shop_id": SHOP, "deleted": True},
        },
    ],
    ids=["envelope", "draft-subscription", "draft-customer-cf_shop_id"],
)
async def test_acted_on_event_without_shop_id_is_rejected(
    start_sidecar: StartSidecar, body: Body
) -> None:
    sidecar = await start_sidecar()

    status, answer = await sidecar.post(body)

    assert status == 422
    assert "shop id" in answer["error"]
    assert _stored(sidecar) == {"deliveries": [], "entitlements": [], "customers": []}


# --- wrong types are 422, never 500 --------------------------------------------

# A placeholder that `_with` turns into raw JSON text: some values (1e400, NaN)
# have no Python value that json.dumps writes back the same way.
RAW = "\x00raw\x00"


def _with(body: Body, path: str, value: Any) -> bytes:
    """Return `body` as JSON with the field at dotted `path` set to `value`."""
    body = copy.deepcopy(body)
    *parents, last = path.split(".")
    node: Any = body
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    raw_text = None
    if isinstance(value, tuple) and value and value[0] == RAW:
        raw_text, value = value[1], RAW
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    text = json.dumps(body)
    if raw_text is not None:
        text = text.replace(json.dumps(RAW), raw_text)
    return text.encode()


def _raw(text: str) -> tuple[str, str]:
    return (RAW, text)


# The bodies each case starts from: every field that parsing reads is present.
SUBSCRIPTION_BODY = _envelope(
    subscription=_subscription(
        plan_id=None,
        subscription_items=[{"item_price_id": "p-EUR", "item_type": "plan"}],
    )
)
MODULE_ID_BODY = _envelope(
    module_id="mymodule", subscription=_subscription(meta_data={})
)
CUSTOMER_BODY = example("envelope-customer-updated.json")
DRAFT_BODY = {
    "event_type": "subscription_created",
    **example("draft-subscription_created.json"),
}
DRAFT_CUSTOMER_BODY = {
    "event_type": "customer_updated",
    **example("draft-customer_updated.json"),
}
BASE_BODIES = [
    SUBSCRIPTION_BODY,
    MODULE_ID_BODY,
    CUSTOMER_BODY,
    DRAFT_BODY,
    DRAFT_CUSTOMER_BODY,
]

WRONG_TYPES = [
    (SUBSCRIPTION_BODY, "eventType", 5),
    (SUBSCRIPTION_BODY, "eventType", ""),
    (SUBSCRIPTION_BODY, "eventType", "subscription updated"),
    (SUBSCRIPTION_BODY, "eventType", "x" * 201),
    (SUBSCRIPTION_BODY, "eventType", ["subscription.updated"]),
    (SUBSCRIPTION_BODY, "data", "x"),
    (SUBSCRIPTION_BODY, "data", []),
    (SUBSCRIPTION_BODY, "data", None),
    (SUBSCRIPTION_BODY, "data.shopId", True),
    (SUBSCRIPTION_BODY, "data.shopId", 1.5),
    (SUBSCRIPTION_BODY, "data.shopId", -1),
    (SUBSCRIPTION_BODY, "data.shopId", ""),
    (SUBSCRIPTION_BODY, "data.shopId", "x" * 65),
    (SUBSCRIPTION_BODY, "data.shopId", "shop/1"),
    (SUBSCRIPTION_BODY, "data.shopId", "caf\u00e9"),
    (SUBSCRIPTION_BODY, "data.shopId", {"id": SHOP}),
    (SUBSCRIPTION_BODY, "data.shopId", _raw("1" * 400)),
    (MODULE_ID_BODY, "data.module_id", 7),
    (MODULE_ID_BODY, "data.module_id", "no spaces please"),
    (SUBSCRIPTION_BODY, "data.subscription", "x"),
    (SUBSCRIPTION_BODY, "data.subscription", [_subscription()]),
    (SUBSCRIPTION_BODY, "data.subscription.status", 1),
    (SUBSCRIPTION_BODY, "data.subscription.status", None),
    (SUBSCRIPTION_BODY, "data.subscription.status", ""),
    (SUBSCRIPTION_BODY, "data.subscription.status", "x" * 65),
    (SUBSCRIPTION_BODY, "data.subscription.plan_id", 3),
    (SUBSCRIPTION_BODY, "data.subscription.plan_id", {"id": "p"}),
    (SUBSCRIPTION_BODY, "data.subscription.plan_id", "p" * 201),
    (SUBSCRIPTION_BODY, "data.subscription.plan_id", "\ud800"),
    (SUBSCRIPTION_BODY, "data.subscription.status", "active\udfff"),
    (SUBSCRIPTION_BODY, "data.subscription.subscription_items", "plan"),
    (SUBSCRIPTION_BODY, "data.subscription.subscription_items", {"0": {}}),
    (SUBSCRIPTION_BODY, "data.subscription.subscription_items.0", "plan"),
    (SUBSCRIPTION_BODY, "data.subscription.subscription_items.0.item_price_id", 9),
    (SUBSCRIPTION_BODY, "data.subscription.trial_end", "1701209600"),
    (SUBSCRIPTION_BODY, "data.subscription.trial_end", True),
    (SUBSCRIPTION_BODY, "data.subscription.trial_end", 1.5),
    (SUBSCRIPTION_BODY, "data.subscription.trial_end", -1),
    (SUBSCRIPTION_BODY, "data.subscription.trial_end", 10**20),
    (SUBSCRIPTION_BODY, "data.subscription.trial_end", _raw("NaN")),
    (SUBSCRIPTION_BODY, "data.subscription.trial_end", _raw("Infinity")),
    (SUBSCRIPTION_BODY, "data.subscription.trial_end", _raw("-Infinity")),
    (SUBSCRIPTION_BODY, "data.subscription.trial_end", _raw("1e400")),
    (SUBSCRIPTION_BODY, "data.subscription.current_term_end", [1]),
    (SUBSCRIPTION_BODY, "data.subscription.updated_at", {}),
    (SUBSCRIPTION_BODY, "data.subscription.resource_version", "1701209650789"),
    (SUBSCRIPTION_BODY, "data.subscription.resource_version", 2.5),
    (SUBSCRIPTION_BODY, "data.subscription.resource_version", 2**63),
    (SUBSCRIPTION_BODY, "data.subscription.resource_version", _raw("9" * 400)),
    (SUBSCRIPTION_BODY, "data.subscription.resource_version", _raw("NaN")),
    (SUBSCRIPTION_BODY, "data.subscription.meta_data", "mymodule"),
    (SUBSCRIPTION_BODY, "data.subscription.meta_data.module", 5),
    (SUBSCRIPTION_BODY, "data.subscription.meta_data.module", ""),
    (SUBSCRIPTION_BODY, "data.subscription.meta_data.module", "my module"),
    (SUBSCRIPTION_BODY, "data.subscription.meta_data.module", "m" * 65),
    (CUSTOMER_BODY, "data.customer", "c1a2b3c4"),
    (CUSTOMER_BODY, "data.customer.deleted", "true"),
    (CUSTOMER_BODY, "data.customer.deleted", 1),
    (CUSTOMER_BODY, "data.customer.resource_version", "x"),
    (CUSTOMER_BODY, "data.customer.resource_version", -1),
    (DRAFT_CUSTOMER_BODY, "customer.updated_at", _raw("1e400")),
    (DRAFT_CUSTOMER_BODY, "customer.updated_at", "2023-11-14T22:13:20Z"),
    (DRAFT_CUSTOMER_BODY, "customer.deleted", "false"),
    (DRAFT_BODY, "event_type", 5),
    (DRAFT_BODY, "customer", "x"),
    (DRAFT_BODY, "customer.ps_shop_id", ["a"]),
    (DRAFT_BODY, "customer.ps_shop_id", False),
    (DRAFT_BODY, "subscription", 0),
    (DRAFT_BODY, "subscription.items", "plan"),
    (DRAFT_BODY, "subscription.items.0.item_id", 1),
    (DRAFT_BODY, "subscription.items.0.trial_end", "soon"),
    (DRAFT_BODY, "subscription.updated_at", -5),
]


@pytest.mark.parametrize(
    ("body", "path", "value"),
    WRONG_TYPES,
    ids=[f"{path}={value!r}"[:60] for _, path, value in WRONG_TYPES],
)
async def test_field_with_wrong_type_is_rejected_and_quarantined(
    start_sidecar: StartSidecar, body: Body, path: str, value: Any
) -> None:
    sidecar = await start_sidecar()
    raw = _with(body, path, value)

    status, answer = await sidecar.post(raw)

    assert status == 422, answer
    assert _stored(sidecar) == {"deliveries": [], "entitlements": [], "customers": []}
    assert sidecar.query("SELECT status, body FROM quarantine") == [(422, raw)]


@pytest.mark.parametrize("body", BASE_BODIES)
async def test_wrong_type_cases_start_from_an_accepted_body(
    start_sidecar: StartSidecar, body: Body
) -> None:
    # Each WRONG_TYPES case changes one field of one of these bodies: unchanged,
    # each must be applied, or a case could be refused for another reason.
    sidecar = await start_sidecar()

    status, answer = await sidecar.post(body)

    assert (status, answer["result"]) == (200, "applied")


@pytest.mark.parametrize(
    ("path", "value", "stored"),
    [
        ("data.subscription.trial_end", 1.8e9, 1800000000),
        ("data.subscription.trial_end", None, None),
        ("data.subscription.current_term_end", 253402300799, 253402300799),
        ("data.subscription.status", "  Active ", "active"),
        ("data.subscription.status", "canceled", "cancelled"),
        ("data.subscription.status", "some_new_status", "some_new_status"),
    ],
)
async def test_field_at_edge_of_its_range_is_accepted(
    start_sidecar: StartSidecar, path: str, value: Any, stored: Any
) -> None:
    sidecar = await start_sidecar()
    field = path.rsplit(".", 1)[1]

    status, _ = await sidecar.post(_with(SUBSCRIPTION_BODY, path, value))

    assert status == 200
    assert sidecar.query(f"SELECT {field} FROM entitlements") == [(stored,)]


async def test_customer_with_null_deleted_counts_as_not_deleted(
    start_sidecar: StartSidecar,
) -> None:
    sidecar = await start_sidecar()

    status, _ = await sidecar.post(_with(CUSTOMER_BODY, "data.customer.deleted", None))

    assert status == 200
    assert sidecar.query("SELECT deleted FROM customers") == [(0,)]


# --- bodies that are not a JSON object ---------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b'{"eventType": "subscription.created",',
        b"[]",
        b'[{"eventType": "subscription.created"}]',
        b"null",
        b"42",
        b'"subscription.created"',
        b"true",
        b'{"eventType": "subscription.created", "data": {"x": "\xff\xfe"}}',
        b'{"eventType": "subscription.created", "data": {"x": "\xed\xa0\x80"}}',
        b"\xff\xfe{\x00}\x00",
        b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"a": ' + b"9" * 5000 + b"}",
    ],
    ids=[
        "empty",
        "text",
        "truncated",
        "empty-array",
        "array",
        "null",
        "number",
        "string",
        "boolean",
        "invalid-utf8",
        "utf8-encoded-surrogate",
        "utf16",
        "deeply-nested",
        "number-too-long",
    ],
)
async def test_body_that_is_not_a_json_object_is_rejected(
    start_sidecar: StartSidecar, raw: bytes
) -> None:
    sidecar = await start_sidecar()

    status, answer = await sidecar.post(raw)

    assert status == 400, answer
    assert _stored(sidecar) == {"deliveries": [], "entitlements": [], "customers": []}
    assert sidecar.query("SELECT status, body FROM quarantine") == [(400, raw)]


async def test_lone_surrogate_escape_in_a_field_not_read_is_accepted(
    start_sidecar: StartSidecar,
) -> None:
    # Legal JSON that some fast parsers refuse: half of an emoji, as a
    # serialiser that cuts strings by UTF-16 units might write it.
    raw = json.dumps(_envelope(note="\ud83d")).encode()
    assert b"\\ud83d" in raw
    sidecar = await start_sidecar()

    status, answer = await sidecar.post(raw)

    assert (status, answer["result"]) == (200, "applied")
    assert sidecar.query("SELECT status FROM entitlements") == [("active",)]
    assert sidecar.query("SELECT body FROM deliveries") == [(raw,)]


async def test_body_with_byte_order_mark_is_accepted(
    start_sidecar: StartSidecar,
) -> None:
    sidecar = await start_sidecar()

    status, answer = await sidecar.post(
        b"\xef\xbb\xbf" + json.dumps(_envelope()).encode()
    )

    assert (status, answer["result"]) == (200, "applied")
