"""Deliveries through the stream: the message format, and applying messages in order.

No NATS server is needed: messages are built and read back in memory, and
applied to a real SQLite file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import SCHEMA_V1_SQL, customer_event, example, subscription_event
from nats_cluster import require_nats
from sidecar.events import parse_event
from sidecar.migrations import MIGRATIONS, SCHEMA_VERSION, migrate
from sidecar.storage import Delivery, connect, open_database
from sidecar.stream_messages import (
    FORMAT_HEADER,
    MSG_ID,
    NewerFormat,
    Refusal,
    message_headers,
    read_message,
)

DEFAULT_PRODUCT = "mymodule"
STREAM = "deliveries"


def _delivery(
    body: dict[str, Any], url_event_type: str | None = None, delivery_id: str = "d1"
) -> Delivery:
    raw = json.dumps(body).encode()
    return Delivery(
        delivery_id=delivery_id,
        received_at=1_700_000_123,
        source="webhook",
        event=parse_event(body, url_event_type, DEFAULT_PRODUCT),
        fallback_version=1_700_000_100_000,
        body=raw,
    )


@pytest.mark.parametrize(
    ("body", "url_event_type"),
    [
        pytest.param(
            subscription_event("shop-1", "active", resource_version=5), None, id="env"
        ),
        pytest.param(subscription_event("shop-1", "paused"), None, id="no-version"),
        pytest.param(
            example("draft-subscription_created.json"),
            "subscription_created",
            id="draft-url-type",
        ),
        pytest.param(
            example("draft-subscription_created.json"),
            "Subscription-Created",
            id="draft-url-type-spelling",
        ),
        pytest.param(
            subscription_event("shop-1", "active"),
            "x\r\nNats-Msg-Id: forged é",
            id="url-type-with-crlf",
        ),
        pytest.param(customer_event("shop-1", True, 9), None, id="customer"),
        pytest.param({"eventType": "invoice.paid", "data": {}}, None, id="ignored"),
    ],
)
def test_message_read_back_is_the_delivery_that_was_published(
    body: dict[str, Any], url_event_type: str | None
) -> None:
    delivery = _delivery(body, url_event_type)

    headers = message_headers(delivery, url_event_type, DEFAULT_PRODUCT)

    assert all("\r" not in value and "\n" not in value for value in headers.values())
    assert read_message(headers, delivery.body or b"", stored_at=1) == delivery


def test_message_uses_the_receiving_hosts_default_product() -> None:
    body = subscription_event("shop-1", "active")
    del body["data"]["subscription"]["meta_data"]
    delivery = _delivery(body)

    headers = message_headers(delivery, None, "other-module")
    read = read_message(headers, delivery.body or b"", stored_at=1)

    assert isinstance(read, Delivery)
    assert read.event.product == "other-module"


def test_message_without_sidecar_headers_is_refused_under_its_body_hash() -> None:
    body = b'{"eventType": "subscription.updated"}'

    read = read_message({MSG_ID: "foreign"}, body, stored_at=1_700_000_000)

    assert read == Refusal(
        hashlib.sha256(body).hexdigest(),
        1_700_000_000,
        400,
        "a stream message without the sidecar's headers",
        body,
    )


def test_message_of_a_newer_format_raises() -> None:
    delivery = _delivery(subscription_event("shop-1", "active"))
    headers = message_headers(delivery, None, DEFAULT_PRODUCT)
    headers[FORMAT_HEADER] = "2"

    with pytest.raises(NewerFormat):
        read_message(headers, delivery.body or b"", stored_at=1)


@pytest.mark.parametrize(
    ("change", "status"),
    [
        ({"Sidecar-Received-At": "soon"}, 400),
        ({"Sidecar-Fallback-Version": ""}, 400),
        ({"Sidecar-Default-Product": ""}, 400),
        ({"body": b"\xff not json"}, 400),
        ({"body": b'{"eventType": "subscription.updated", "data": {}}'}, 422),
    ],
)
def test_message_that_cannot_be_applied_is_refused_with_its_status(
    change: dict[str, Any], status: int
) -> None:
    delivery = _delivery(subscription_event("shop-1", "active"))
    headers = message_headers(delivery, None, DEFAULT_PRODUCT)
    body = change.pop("body", delivery.body)
    headers.update(change)

    read = read_message(headers, body, stored_at=1)

    assert isinstance(read, Refusal)
    assert (read.delivery_id, read.status) == ("d1", status)


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    with contextlib.closing(open_database(str(tmp_path / "sidecar.db"))) as opened:
        yield opened


def _apply(conn: sqlite3.Connection, items: list[Any]) -> list[str]:
    from sidecar.follower import apply_items

    conn.execute("BEGIN IMMEDIATE")
    results = apply_items(conn, STREAM, "created-1", items)
    conn.execute("COMMIT")
    return results


def test_apply_items_records_each_and_moves_the_position(
    conn: sqlite3.Connection,
) -> None:
    require_nats(server_too=False)
    from sidecar.follower import Item, read_position

    items = [
        Item(1, _delivery(subscription_event("s", "active", resource_version=2))),
        Item(
            2,
            _delivery(
                subscription_event("s", "paused", resource_version=1), delivery_id="d2"
            ),
        ),
        Item(3, Refusal("d3", 5, 422, "no shop", b"{}")),
    ]

    assert _apply(conn, items) == ["applied", "stale", "rejected_422"]
    position = read_position(conn, STREAM)
    assert position is not None and (position.created, position.sequence) == (
        "created-1",
        3,
    )
    assert conn.execute("SELECT status FROM entitlements").fetchall() == [("active",)]
    assert conn.execute("SELECT delivery_id FROM quarantine").fetchall() == [("d3",)]


def test_apply_items_skips_what_the_position_already_covers(
    conn: sqlite3.Connection,
) -> None:
    require_nats(server_too=False)
    from sidecar.follower import Item

    first = Item(1, _delivery(subscription_event("s", "active", resource_version=1)))
    _apply(conn, [first])
    again = Item(1, _delivery(subscription_event("s", "paused", resource_version=9)))

    assert _apply(conn, [again]) == ["duplicate"]
    assert conn.execute("SELECT status FROM entitlements").fetchall() == [("active",)]


def test_apply_items_rolled_back_leaves_no_position(conn: sqlite3.Connection) -> None:
    require_nats(server_too=False)
    from sidecar.follower import Item, apply_items, read_position

    conn.execute("BEGIN IMMEDIATE")
    apply_items(conn, STREAM, "c", [Item(1, _delivery(subscription_event("s", "x")))])
    conn.execute("ROLLBACK")

    assert read_position(conn, STREAM) is None
    assert conn.execute("SELECT count(*) FROM deliveries").fetchone() == (0,)


def test_database_at_version_2_gains_the_stream_position_table(
    tmp_path: Path,
) -> None:
    with contextlib.closing(open_database(str(tmp_path / "fresh.db"))) as conn:
        fresh = conn.execute("PRAGMA table_info(stream_position)").fetchall()
    path = str(tmp_path / "sidecar.db")
    # Version 2 is the first release's schema with its first step applied.
    with contextlib.closing(connect(path)) as conn:
        migrate(conn, {1: MIGRATIONS[1]}, schema=SCHEMA_V1_SQL.read_text())

    with contextlib.closing(open_database(path)) as upgraded:
        version = upgraded.execute("PRAGMA user_version").fetchone()[0]
        columns = upgraded.execute("PRAGMA table_info(stream_position)").fetchall()

    assert version == SCHEMA_VERSION
    assert columns == fresh
