"""Bring the table up to date from outside the webhook path: import and reconcile.

`import_lines` applies a file of JSON lines (webhook bodies of either dialect,
or bare subscriptions with their shop id) as deliveries from source `import`.
`reconcile` asks the Billing API again about known shops. Both go through the
same parsing and ordering rules as a webhook, so they apply only what is newer,
and running either twice changes nothing the second time.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .billing import BillingClient, BillingError
from .entitlement import StoredEntitlement
from .events import Event, EventError, Kind, parse_event, subscription_state
from .fetch import api_delivery, record_and_read
from .settings import PRODUCT_PATTERN, SHOP_ID_PATTERN
from .storage import Delivery, read_entitlement, record_delivery
from .types import Clock

T = TypeVar("T")

IMPORT_SOURCE = "import"
# Stored as the event type of a line that is a bare subscription.
IMPORT_EVENT_TYPE = "subscription.imported"
# Lines committed per transaction: fast, and a failure loses little.
BATCH_LINES = 500
RECONCILE_CONCURRENCY = 4


@dataclass(frozen=True)
class BadLine:
    line_number: int
    reason: str


@dataclass
class ImportReport:
    """How many lines ended with each result, and which lines were refused."""

    counts: Counter[str] = field(default_factory=Counter)
    bad_lines: list[BadLine] = field(default_factory=list)


def import_file(
    conn: sqlite3.Connection,
    path: str,
    default_product: str,
    clock: Clock = time.time,
) -> ImportReport:
    """Import a JSON-lines file; see `import_lines`."""
    with open(path, "rb") as lines:
        return import_lines(conn, lines, default_product, clock)


def import_lines(
    conn: sqlite3.Connection,
    lines: Iterable[bytes],
    default_product: str,
    clock: Clock = time.time,
) -> ImportReport:
    """Apply each line as a delivery; count results, and report bad lines.

    A line's delivery id is derived from its content, so importing the same
    lines again counts them as duplicates and changes nothing.
    """
    report = ImportReport()
    batch: list[Delivery] = []
    for line_number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            continue
        try:
            delivery = _line_delivery(line, default_product, int(clock()))
        except EventError as exc:
            report.counts["rejected"] += 1
            report.bad_lines.append(BadLine(line_number, exc.reason))
            continue
        batch.append(delivery)
        if len(batch) >= BATCH_LINES:
            _record_batch(conn, batch, report)
            batch = []
    if batch:
        _record_batch(conn, batch, report)
    return report


def _line_delivery(line: bytes, default_product: str, received_at: int) -> Delivery:
    try:
        body = json.loads(line)
    except (ValueError, RecursionError):
        raise EventError(400, "the line is not valid JSON") from None

    if isinstance(body, dict) and "shop_id" in body:
        event = _bare_subscription(body, default_product)
    else:
        event = parse_event(body, None, default_product)

    # Canonical JSON, so that re-serialising a file does not make new deliveries.
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return Delivery(
        delivery_id=f"{IMPORT_SOURCE}:{digest}",
        received_at=received_at,
        source=IMPORT_SOURCE,
        event=event,
        fallback_version=received_at * 1000,
        body=line,
    )


def _bare_subscription(body: dict[str, Any], default_product: str) -> Event:
    shop_id = body["shop_id"]
    if isinstance(shop_id, int) and not isinstance(shop_id, bool) and shop_id >= 0:
        shop_id = str(shop_id)
    if not isinstance(shop_id, str) or not SHOP_ID_PATTERN.fullmatch(shop_id):
        raise EventError(422, "shop_id must be 1 to 64 characters of A-Z a-z 0-9 _ -")

    subscription = body.get("subscription")
    if not isinstance(subscription, dict):
        raise EventError(422, "a line with shop_id needs a subscription object")

    meta = subscription.get("meta_data")
    module = meta.get("module") if isinstance(meta, dict) else None
    product = body.get("product", module)
    if product is None:
        product = default_product
    if not isinstance(product, str) or not PRODUCT_PATTERN.fullmatch(product):
        raise EventError(422, "product must be 1 to 64 characters of A-Z a-z 0-9 _ . -")

    return Event(
        event_type=IMPORT_EVENT_TYPE,
        kind=Kind.SUBSCRIPTION,
        shop_id=shop_id,
        product=product,
        subscription=subscription_state(subscription, "subscription"),
    )


def _record_batch(
    conn: sqlite3.Connection, batch: list[Delivery], report: ImportReport
) -> None:
    outcomes = _in_transaction(
        conn, lambda: [record_delivery(conn, delivery) for delivery in batch]
    )
    report.counts.update(outcome.result for outcome in outcomes)


def _in_transaction(conn: sqlite3.Connection, work: Callable[[], T]) -> T:
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = work()
        conn.execute("COMMIT")
    except BaseException:
        # A failed COMMIT (disk full) may already have rolled back.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


@dataclass(frozen=True)
class Reconciled:
    """What re-fetching one (shop, product) did.

    `result` is a delivery result (`applied`, `stale`, `duplicate`), or
    `unknown` when the API does not know the pair, or `failed` with `error`.
    """

    shop_id: str
    product: str
    result: str
    before: StoredEntitlement | None = None
    after: StoredEntitlement | None = None
    error: str | None = None


async def reconcile(
    conn: sqlite3.Connection,
    client: BillingClient,
    shop_ids: Sequence[str] = (),
    default_product: str = "default",
    clock: Clock = time.time,
) -> list[Reconciled]:
    """Re-fetch the given shops, or every (shop, product) stored, and apply them.

    A shop given by id is fetched for each product stored for it, or for
    `default_product` when none is. Failures are reported, not raised.
    """
    for shop_id in shop_ids:
        if not SHOP_ID_PATTERN.fullmatch(shop_id):
            raise ValueError(
                f"expected a shop id of 1 to 64 characters of A-Z a-z 0-9 _ -,"
                f" got {shop_id!r}"
            )
    targets = _targets(conn, shop_ids, default_product)
    # A few requests at a time: quicker than one by one, and gentle on the API.
    gate = asyncio.Semaphore(RECONCILE_CONCURRENCY)

    async def one(shop_id: str, product: str) -> Reconciled:
        async with gate:
            return await _reconcile_one(conn, client, shop_id, product, clock)

    return list(await asyncio.gather(*(one(*target) for target in targets)))


def _targets(
    conn: sqlite3.Connection, shop_ids: Sequence[str], default_product: str
) -> list[tuple[str, str]]:
    if not shop_ids:
        rows = conn.execute(
            "SELECT shop_id, product FROM entitlements ORDER BY shop_id, product"
        )
        return [(shop_id, product) for shop_id, product in rows]

    targets: list[tuple[str, str]] = []
    for shop_id in dict.fromkeys(shop_ids):
        products = [
            product
            for (product,) in conn.execute(
                "SELECT product FROM entitlements WHERE shop_id = ? ORDER BY product",
                (shop_id,),
            )
        ]
        targets.extend((shop_id, product) for product in products or [default_product])
    return targets


async def _reconcile_one(
    conn: sqlite3.Connection,
    client: BillingClient,
    shop_id: str,
    product: str,
    clock: Clock,
) -> Reconciled:
    try:
        fetched = await client.fetch_subscription(shop_id, product)
    except BillingError as exc:
        return Reconciled(shop_id, product, "failed", error=str(exc))
    if fetched is None:
        return Reconciled(shop_id, product, "unknown")

    delivery = api_delivery(fetched, int(clock()))

    def apply() -> Reconciled:
        before = read_entitlement(conn, shop_id, product)
        outcome, after = record_and_read(conn, delivery)
        return Reconciled(shop_id, product, outcome.result, before, after)

    return _in_transaction(conn, apply)
