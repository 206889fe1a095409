"""Ingest load: signed deliveries over HTTP, and the storage ceiling beside it.

The ceiling does the same inserts as the sidecar (its own `record_delivery`)
in this process, one transaction per event, with the sidecar's durability
settings, so the ratio shows what the HTTP path and the signature check cost
on top of the fsync that every acknowledged delivery needs.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from standardwebhooks.webhooks import Webhook

from bench.load import LoadResult, load_result, run_connections
from bench.shops import PRODUCT, shop_id
from sidecar.events import parse_event
from sidecar.storage import Delivery, connect, record_delivery

# Deliveries signed ahead per second of each run: more than the sidecar takes.
SIGNED_PER_S = 4000
# Added to every resource version made in this process, so that each body is
# newer than all made before it, in whatever run: each one is applied.
_SEQUENCE = itertools.count()


@dataclass(frozen=True)
class SignedDelivery:
    delivery_id: str
    body: bytes
    headers: dict[str, str]


def subscription_bodies(prefix: str, shops: int, seed: int) -> Iterator[bytes]:
    """Distinct subscription.updated envelopes, each newer than what is stored."""
    rng = random.Random(seed)
    now = int(time.time())
    for number in itertools.count():
        index = rng.randrange(shops)
        payload = _envelope(shop_id(index), now, now * 1000 + next(_SEQUENCE))
        payload["data"]["subscription"]["id"] = f"{prefix}{number}"
        yield json.dumps(payload).encode()


def signed_deliveries(
    secret: str, shops: int, count: int, prefix: str, seed: int
) -> list[SignedDelivery]:
    """`count` deliveries signed now the way Billing signs them."""
    webhook = Webhook(secret)
    now = datetime.now(UTC)
    timestamp = str(int(now.timestamp()))
    deliveries = []
    bodies = subscription_bodies(prefix, shops, seed)
    for number, body in enumerate(itertools.islice(bodies, count)):
        delivery_id = f"msg_{prefix}{number}"
        headers = {
            "Content-Type": "application/json",
            "webhook-id": delivery_id,
            "webhook-timestamp": timestamp,
            "webhook-signature": webhook.sign(delivery_id, now, body),
        }
        deliveries.append(SignedDelivery(delivery_id, body, headers))
    return deliveries


def post_requests(deliveries: list[SignedDelivery], host: str) -> list[bytes]:
    """Each delivery as the raw keep-alive HTTP request that carries it."""
    requests = []
    for delivery in deliveries:
        headers = "".join(
            f"{name}: {value}\r\n" for name, value in delivery.headers.items()
        )
        head = (
            f"POST /webhooks HTTP/1.1\r\nHost: {host}\r\n{headers}"
            f"Content-Length: {len(delivery.body)}\r\n\r\n"
        )
        requests.append(head.encode() + delivery.body)
    return requests


def run_senders(
    address: str, senders: int, duration_s: float, deliveries: list[SignedDelivery]
) -> LoadResult:
    """POST each delivery once from `senders` concurrent senders, for `duration_s`."""
    requests = post_requests(deliveries, address)
    return run_connections(address, senders, duration_s, requests, repeat=False)


def storage_ceiling(db: Path, shops: int, duration_s: float, prefix: str) -> LoadResult:
    """Record deliveries in-process, one committed transaction each."""
    count = int(SIGNED_PER_S * duration_s)
    received_at = int(time.time())
    deliveries = [
        Delivery(
            delivery_id=f"msg_{prefix}{number}",
            received_at=received_at,
            source="webhook",
            event=parse_event(json.loads(body), None, PRODUCT),
            fallback_version=received_at * 1000,
            body=body,
        )
        for number, body in enumerate(
            itertools.islice(subscription_bodies(prefix, shops, 5), count)
        )
    ]

    latencies_s = []
    conn = connect(str(db))
    try:
        started = time.perf_counter()
        stop_at = started + duration_s
        for delivery in deliveries:
            began = time.perf_counter()
            if began >= stop_at:
                break
            conn.execute("BEGIN IMMEDIATE")
            record_delivery(conn, delivery)
            conn.execute("COMMIT")
            latencies_s.append(time.perf_counter() - began)
        elapsed_s = time.perf_counter() - started
    finally:
        conn.close()
    return load_result(latencies_s, 0, elapsed_s)


def _envelope(shop: str, now: int, resource_version: int) -> dict[str, Any]:
    # The shape and size of what Billing sends for a plan change, personal
    # data included, since the sidecar stores the whole body.
    customer_id = f"cus-{shop[:8]}"
    return {
        "eventType": "subscription.updated",
        "data": {
            "shopId": shop,
            "customer": {
                "id": customer_id,
                "email": "merchant@example.com",
                "auto_collection": "on",
                "created_at": now - 86400 * 90,
                "updated_at": now - 86400,
                "deleted": False,
                "object": "customer",
                "billing_address": {
                    "first_name": "Ada",
                    "last_name": "Martin",
                    "line1": "12 quai des Chartrons",
                    "city": "Bordeaux",
                    "country": "FR",
                    "zip": "33000",
                    "object": "billing_address",
                },
                "preferred_currency_code": "EUR",
                "cf_shop_id": shop,
                "meta_data": {"shop_url": "https://shop.example.com"},
            },
            "subscription": {
                "id": "",
                "billing_period": 1,
                "billing_period_unit": "month",
                "customer_id": customer_id,
                "status": "active",
                "current_term_start": now - 86400,
                "current_term_end": now + 86400 * 29,
                "next_billing_at": now + 86400 * 29,
                "created_at": now - 86400 * 90,
                "started_at": now - 86400 * 90,
                "updated_at": now,
                "resource_version": resource_version,
                "deleted": False,
                "object": "subscription",
                "currency_code": "EUR",
                "meta_data": {"module": PRODUCT},
                "subscription_items": [
                    {
                        "item_price_id": "mymodule-pro-EUR-monthly",
                        "item_type": "plan",
                        "quantity": 1,
                        "unit_price": 1990,
                        "object": "subscription_item",
                    }
                ],
            },
        },
    }
