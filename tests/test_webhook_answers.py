"""What the webhook listener answers, and what each answer leaves in the database."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from conftest import (
    BASIC_TOKEN,
    Running,
    StartSidecar,
    basic_headers,
    example,
    signed_headers,
)

SHOP = "3f9c2b7e-51d4-4c1a-9e0b-7a6d2c8e1f43"
CREATED = example("envelope-subscription-created.json")
ACTIVE = example("envelope-subscription-status-updated.json")
BASIC_ONLY = {"SIDECAR_WEBHOOK_SECRET": "", "SIDECAR_BASIC_AUTH": BASIC_TOKEN}

Tables = dict[str, list[tuple[Any, ...]]]


def _tables(sidecar: Running) -> Tables:
    return {
        table: sidecar.query(f"SELECT * FROM {table} ORDER BY 1")
        for table in ("deliveries", "entitlements", "customers", "quarantine")
    }


def _changed(before: Tables, after: Tables) -> set[str]:
    return {table for table in before if before[table] != after[table]}


# --- one test per row of the answer table ---------------------------------------


async def test_new_state_is_applied_and_recorded(sidecar: Running) -> None:
    before = _tables(sidecar)

    status, answer = await sidecar.post(CREATED, delivery_id="msg_created")

    assert status == 200
    assert answer == {"result": "applied", "delivery_id": "msg_created"}
    assert _changed(before, _tables(sidecar)) == {"deliveries", "entitlements"}
    assert sidecar.query("SELECT delivery_id, result FROM deliveries") == [
        ("msg_created", "applied")
    ]
    assert sidecar.query("SELECT shop_id, status, delivery_id FROM entitlements") == [
        (SHOP, "in_trial", "msg_created")
    ]


async def test_same_delivery_again_is_duplicate_and_changes_nothing(
    sidecar: Running,
) -> None:
    await sidecar.post(CREATED, delivery_id="msg_created")
    before = _tables(sidecar)

    status, answer = await sidecar.post(CREATED, delivery_id="msg_created")

    assert (status, answer["result"]) == (200, "duplicate")
    assert _changed(before, _tables(sidecar)) == set()


async def test_delivery_id_seen_before_is_duplicate_even_with_newer_state(
    sidecar: Running,
) -> None:
    await sidecar.post(CREATED, delivery_id="msg_1")
    before = _tables(sidecar)

    status, answer = await sidecar.post(ACTIVE, delivery_id="msg_1")

    assert (status, answer["result"]) == (200, "duplicate")
    assert _changed(before, _tables(sidecar)) == set()


async def test_older_state_is_stale_and_changes_only_the_delivery_log(
    sidecar: Running,
) -> None:
    await sidecar.post(ACTIVE)
    before = _tables(sidecar)

    status, answer = await sidecar.post(CREATED, delivery_id="msg_late")

    assert (status, answer["result"]) == (200, "stale")
    assert _changed(before, _tables(sidecar)) == {"deliveries"}
    assert sidecar.query(
        "SELECT result FROM deliveries WHERE delivery_id = 'msg_late'"
    ) == [("stale",)]


async def test_event_type_not_acted_on_is_ignored_and_only_logged(
    sidecar: Running,
) -> None:
    body = {"eventType": "invoice.generated", "data": {"shopId": SHOP}}
    before = _tables(sidecar)

    status, answer = await sidecar.post(body, delivery_id="msg_invoice")

    assert (status, answer["result"]) == (200, "ignored")
    assert _changed(before, _tables(sidecar)) == {"deliveries"}
    assert sidecar.query("SELECT event_type, result, body FROM deliveries") == [
        ("invoice.generated", "ignored", json.dumps(body).encode())
    ]


async def test_bad_authentication_is_401_and_stores_nothing(sidecar: Running) -> None:
    await sidecar.post(CREATED)
    before = _tables(sidecar)

    status, answer = await sidecar.post(ACTIVE, headers={"webhook-signature": "v1,x"})

    assert status == 401
    assert set(answer) == {"status", "error"}
    assert _changed(before, _tables(sidecar)) == set()


@pytest.mark.parametrize(
    "raw", [b"{not json", b"[1, 2]", b"\xff\xfe\xfd", b'"just a string"']
)
async def test_body_not_a_json_object_is_400_and_quarantined(
    sidecar: Running, raw: bytes
) -> None:
    await sidecar.post(CREATED)
    before = _tables(sidecar)

    status, answer = await sidecar.post(raw, delivery_id="msg_bad")

    assert status == 400
    assert _changed(before, _tables(sidecar)) == {"quarantine"}
    [(delivery_id, attempts, stored_status, reason, body)] = sidecar.query(
        "SELECT delivery_id, attempts, status, reason, body FROM quarantine"
    )
    assert (delivery_id, attempts, stored_status, body) == ("msg_bad", 1, 400, raw)
    assert reason == answer["error"]
    assert reason.startswith("the body")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (
            {"eventType": "subscription.created", "data": {"subscription": {}}},
            "no shop id",
        ),
        (
            {"eventType": "subscription.created", "data": {"shopId": "a b"}},
            "data.shopId",
        ),
        (
            {"eventType": "subscription.created", "data": {"shopId": SHOP}},
            "subscription",
        ),
        (
            {
                "eventType": "subscription.created",
                "data": {"shopId": SHOP, "subscription": {"status": 5}},
            },
            "data.subscription.status",
        ),
    ],
    ids=["no-shop-id", "bad-shop-id", "no-subscription", "bad-status"],
)
async def test_object_without_usable_shop_or_state_is_422_and_quarantined(
    sidecar: Running, body: dict[str, Any], reason: str
) -> None:
    await sidecar.post(CREATED)
    before = _tables(sidecar)

    status, answer = await sidecar.post(body, delivery_id="msg_unusable")

    assert status == 422
    assert _changed(before, _tables(sidecar)) == {"quarantine"}
    assert sidecar.query("SELECT delivery_id, status, reason FROM quarantine") == [
        ("msg_unusable", 422, answer["error"])
    ]
    assert reason in answer["error"]


async def test_refused_delivery_retried_keeps_one_quarantine_row(
    sidecar: Running,
) -> None:
    body = {"eventType": "subscription.created", "data": {"shopId": SHOP}}

    for _ in range(3):
        status, _ = await sidecar.post(body, delivery_id="msg_retried")

    assert status == 422
    assert sidecar.query("SELECT delivery_id, attempts FROM quarantine") == [
        ("msg_retried", 3)
    ]


async def test_unauthenticated_bad_body_is_401_and_not_quarantined(
    sidecar: Running,
) -> None:
    status, _ = await sidecar.post(b"{not json", sign=False)

    assert status == 401
    assert _tables(sidecar)["quarantine"] == []


# --- body size ---------------------------------------------------------------

LIMIT = 2048


def _padded(size: int) -> bytes:
    """A valid event body of exactly `size` bytes."""
    bare = json.dumps({**CREATED, "padding": ""}).encode()
    body = json.dumps({**CREATED, "padding": "x" * (size - len(bare))}).encode()
    assert len(body) == size
    return body


async def test_body_at_the_limit_is_accepted(start_sidecar: StartSidecar) -> None:
    sidecar = await start_sidecar(env={"SIDECAR_MAX_BODY_BYTES": str(LIMIT)})

    status, answer = await sidecar.post(_padded(LIMIT))

    assert (status, answer["result"]) == (200, "applied")


@pytest.mark.parametrize("sign", [True, False])
async def test_body_over_the_limit_is_413_and_stores_nothing(
    start_sidecar: StartSidecar, sign: bool
) -> None:
    sidecar = await start_sidecar(env={"SIDECAR_MAX_BODY_BYTES": str(LIMIT)})

    status, answer = await sidecar.post(_padded(LIMIT + 1), sign=sign)

    assert status == 413
    assert str(LIMIT) in answer["error"]
    assert all(rows == [] for rows in _tables(sidecar).values())


async def test_streamed_body_over_the_limit_is_413_and_stores_nothing(
    start_sidecar: StartSidecar,
) -> None:
    sidecar = await start_sidecar(env={"SIDECAR_MAX_BODY_BYTES": str(LIMIT)})
    body = _padded(4 * LIMIT)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 512):
            yield body[start : start + 512]

    # Without Content-Length the limit is found while reading.
    async with sidecar.session.post(
        sidecar.webhook_url + "/webhooks", data=chunks(), headers=signed_headers(body)
    ) as response:
        assert response.status == 413
    assert all(rows == [] for rows in _tables(sidecar).values())


async def test_default_limit_refuses_a_body_over_one_mebibyte(
    sidecar: Running,
) -> None:
    status, _ = await sidecar.post(_padded(1_048_577))

    assert status == 413
    assert all(rows == [] for rows in _tables(sidecar).values())


# --- delivery identity ---------------------------------------------------------


@pytest.mark.parametrize("prefix", ["webhook-", "svix-"])
async def test_delivery_id_is_the_id_header(sidecar: Running, prefix: str) -> None:
    status, answer = await sidecar.post(CREATED, prefix=prefix, delivery_id="msg_2Xy")

    assert (status, answer["delivery_id"]) == (200, "msg_2Xy")
    assert sidecar.query("SELECT delivery_id FROM deliveries") == [("msg_2Xy",)]


async def test_delivery_without_id_header_is_known_by_body_hash(
    start_sidecar: StartSidecar,
) -> None:
    sidecar = await start_sidecar(env=BASIC_ONLY)
    raw = json.dumps(CREATED).encode()

    status, answer = await sidecar.post(raw, headers=basic_headers(), sign=False)

    assert status == 200
    assert answer["delivery_id"] == hashlib.sha256(raw).hexdigest()
    assert sidecar.query("SELECT delivery_id FROM deliveries") == [
        (hashlib.sha256(raw).hexdigest(),)
    ]


async def test_same_body_without_id_header_is_duplicate(
    start_sidecar: StartSidecar,
) -> None:
    sidecar = await start_sidecar(env=BASIC_ONLY)
    raw = json.dumps(CREATED).encode()

    first = await sidecar.post(raw, headers=basic_headers(), sign=False)
    second = await sidecar.post(raw, headers=basic_headers(), sign=False)
    # One byte more is another delivery, though it says the same.
    third = await sidecar.post(raw + b"\n", headers=basic_headers(), sign=False)

    results = [answer["result"] for _, answer in (first, second, third)]
    assert results == ["applied", "duplicate", "stale"]
    assert sidecar.query("SELECT count(*) FROM deliveries") == [(2,)]


async def test_same_body_with_different_ids_is_two_deliveries(
    sidecar: Running,
) -> None:
    first = await sidecar.post(CREATED, delivery_id="msg_a")
    second = await sidecar.post(CREATED, delivery_id="msg_b")

    assert [first[1]["result"], second[1]["result"]] == ["applied", "stale"]
    assert sidecar.query("SELECT delivery_id FROM deliveries ORDER BY 1") == [
        ("msg_a",),
        ("msg_b",),
    ]


async def test_concurrent_copies_of_a_delivery_apply_once(sidecar: Running) -> None:
    raw = json.dumps(CREATED).encode()
    headers = signed_headers(raw, delivery_id="msg_storm")

    answers = await asyncio.gather(
        *(sidecar.post(raw, headers=headers, sign=False) for _ in range(20))
    )

    results = sorted(answer["result"] for status, answer in answers if status == 200)
    assert results == ["applied"] + ["duplicate"] * 19
    assert sidecar.query("SELECT count(*) FROM deliveries") == [(1,)]


@pytest.mark.parametrize(
    "delivery_id",
    ["x" * 201, "msg with spaces", "msg_\u00e9t\u00e9", "msg\ttab"],
    ids=["too-long", "space", "non-ascii", "tab"],
)
async def test_malformed_delivery_id_is_refused(
    sidecar: Running, delivery_id: str
) -> None:
    status, answer = await sidecar.post(CREATED, delivery_id=delivery_id)

    assert 400 <= status < 500
    assert "webhook-id" in answer["error"]
    assert _tables(sidecar)["deliveries"] == []
    assert _tables(sidecar)["entitlements"] == []


@pytest.mark.parametrize("name", ["webhook-id", "svix-id"])
async def test_empty_delivery_id_header_is_refused(
    start_sidecar: StartSidecar, name: str
) -> None:
    sidecar = await start_sidecar(env=BASIC_ONLY)

    status, answer = await sidecar.post(
        CREATED, headers={**basic_headers(), name: ""}, sign=False
    )

    assert status == 400
    assert "webhook-id" in answer["error"]
    assert _tables(sidecar)["deliveries"] == []


async def test_delivery_id_of_200_printable_characters_is_accepted(
    sidecar: Running,
) -> None:
    delivery_id = "msg_" + "!~" * 98

    status, answer = await sidecar.post(CREATED, delivery_id=delivery_id)

    assert (status, answer["result"]) == (200, "applied")
    assert sidecar.query("SELECT delivery_id FROM deliveries") == [(delivery_id,)]


# --- routes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/webhooks", 405),
        ("PUT", "/webhooks/subscription.created", 405),
        ("DELETE", "/webhooks", 405),
        ("POST", "/", 404),
        ("POST", "/webhook", 404),
        ("POST", "/webhooks/", 404),
        ("POST", "/webhooks/subscription/created", 404),
        ("POST", "/entitlement/" + SHOP, 404),
    ],
)
async def test_other_route_is_json_error_and_stores_nothing(
    sidecar: Running, method: str, path: str, status: int
) -> None:
    before = _tables(sidecar)
    raw = json.dumps(CREATED).encode()

    async with sidecar.session.request(
        method, sidecar.webhook_url + path, data=raw, headers=signed_headers(raw)
    ) as response:
        assert (response.status, response.content_type) == (status, "application/json")
        body = await response.json()
        allow = response.headers.get("Allow")

    assert body["status"] == status
    assert isinstance(body["error"], str) and body["error"]
    assert allow == ("POST" if status == 405 else None)
    assert _tables(sidecar) == before
