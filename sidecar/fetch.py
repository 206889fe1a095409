"""Fetch on miss: ask the Billing API about a shop the table does not know.

A lookup for an unknown (shop, product) may be a gap the webhooks left, so the
API is asked, and its answer is stored like a delivery (source `api`) under the
same ordering rule before the lookup is answered from the table. Lookups are
cheap and the API is not, so the fetches are bounded three ways: one request in
flight per (shop, product), which every other lookup for it awaits; a negative
cache of what the API does not know; and a token bucket over all fetches, past
which a lookup is answered "unknown" without asking.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from .billing import BillingAuthError, BillingClient, BillingError, BillingSubscription
from .entitlement import StoredEntitlement
from .events import Event, Kind
from .storage import Delivery, Outcome, Writer, read_entitlement, record_delivery
from .types import Clock

API_SOURCE = "api"
# Stored as the event type of a delivery made from an API answer.
API_EVENT_TYPE = "subscription.fetched"
NEGATIVE_TTL_S = 600.0
RATE_PER_S = 5.0
BURST = 10
# Tell the operator about skipped fetches at most this often.
LIMIT_WARNING_INTERVAL_S = 60.0

log = logging.getLogger("sidecar.fetch")

Key = tuple[str, str]


class FetchStatus(Enum):
    FOUND = "found"
    UNKNOWN = "unknown"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "upstream_unavailable"


@dataclass(frozen=True)
class FetchResult:
    """What a fetch learnt; `entitlement` is the stored row when FOUND."""

    status: FetchStatus
    entitlement: StoredEntitlement | None = None


def api_delivery(fetched: BillingSubscription, received_at: int) -> Delivery:
    """Turn an API answer into a delivery; the same state gets the same id."""
    event = Event(
        event_type=API_EVENT_TYPE,
        kind=Kind.SUBSCRIPTION,
        shop_id=fetched.shop_id,
        product=fetched.product,
        subscription=fetched.state,
    )
    state = fetched.state
    if state.resource_version is not None:
        version = str(state.resource_version)
    elif state.updated_at is not None:
        version = str(state.updated_at * 1000)
    else:
        version = "sha256-" + hashlib.sha256(fetched.body).hexdigest()[:32]
    return Delivery(
        delivery_id=f"api:{fetched.shop_id}:{fetched.product}:{version}",
        received_at=received_at,
        source=API_SOURCE,
        event=event,
        fallback_version=received_at * 1000,
        body=fetched.body,
    )


def record_and_read(
    conn: sqlite3.Connection, delivery: Delivery
) -> tuple[Outcome, StoredEntitlement | None]:
    """Record a delivery and read back its row; call inside a transaction."""
    outcome = record_delivery(conn, delivery)
    event = delivery.event
    assert event.shop_id is not None and event.product is not None
    return outcome, read_entitlement(conn, event.shop_id, event.product)


class TokenBucket:
    """Allows `rate_per_s` on average, and bursts of up to `burst`."""

    def __init__(
        self, rate_per_s: float, burst: int, clock: Callable[[], float]
    ) -> None:
        self._rate_per_s = rate_per_s
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()

    def take(self) -> bool:
        now = self._clock()
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(self._burst, self._tokens + elapsed * self._rate_per_s)
        self._updated = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class Fetcher:
    """Fetches unknown (shop, product) pairs from the Billing API and stores them."""

    def __init__(
        self,
        client: BillingClient,
        writer: Writer,
        *,
        budget_s: float,
        negative_ttl_s: float = NEGATIVE_TTL_S,
        rate_per_s: float = RATE_PER_S,
        burst: int = BURST,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Clock = time.time,
    ) -> None:
        self._client = client
        self._writer = writer
        self._budget_s = budget_s
        self._negative_ttl_s = negative_ttl_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._bucket = TokenBucket(rate_per_s, burst, clock)
        self._in_flight: dict[Key, asyncio.Task[FetchResult]] = {}
        # Expiry time by key, in insertion order, which is also expiry order.
        self._unknown: dict[Key, float] = {}
        self._skipped = 0
        self._warned_at: float | None = None

    async def fetch(self, shop_id: str, product: str) -> FetchResult:
        """Learn about a (shop, product) the table does not know.

        Raise StorageUnavailable if the answer could not be stored.
        """
        key = (shop_id, product)
        if self._known_unknown(key):
            return FetchResult(FetchStatus.UNKNOWN)

        task = self._in_flight.get(key)
        if task is None:
            if not self._bucket.take():
                self._note_skipped()
                return FetchResult(FetchStatus.RATE_LIMITED)
            task = asyncio.create_task(self._fetch_and_store(shop_id, product))
            self._in_flight[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        # Shielded so that one lookup giving up does not cancel the others' fetch.
        return await asyncio.shield(task)

    async def close(self) -> None:
        """Cancel the fetches in flight and wait for them to end."""
        tasks = list(self._in_flight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _fetch_and_store(self, shop_id: str, product: str) -> FetchResult:
        try:
            fetched = await self._client.fetch_subscription(
                shop_id, product, budget_s=self._budget_s
            )
        except BillingAuthError as exc:
            log.error("cannot fetch shop=%s product=%s: %s", shop_id, product, exc)
            return FetchResult(FetchStatus.UNAVAILABLE)
        except BillingError as exc:
            log.warning("cannot fetch shop=%s product=%s: %s", shop_id, product, exc)
            return FetchResult(FetchStatus.UNAVAILABLE)

        if fetched is None:
            self._remember_unknown((shop_id, product))
            log.info(
                "shop=%s product=%s is unknown to the Billing API", shop_id, product
            )
            return FetchResult(FetchStatus.UNKNOWN)

        delivery = api_delivery(fetched, int(self._wall_clock()))
        outcome, row = await self._writer.submit(
            lambda conn: record_and_read(conn, delivery)
        )
        log.info(
            "delivery %s type=%s shop=%s product=%s result=%s",
            delivery.delivery_id,
            API_EVENT_TYPE,
            shop_id,
            product,
            outcome.result,
        )
        if row is None:
            return FetchResult(FetchStatus.UNKNOWN)
        return FetchResult(FetchStatus.FOUND, row)

    def _forget(self, key: Key, task: asyncio.Task[FetchResult]) -> None:
        if self._in_flight.get(key) is task:
            del self._in_flight[key]
        # Retrieve a failure even if every waiter has gone, so it is not
        # reported as never retrieved; the waiters still receive it.
        if not task.cancelled():
            task.exception()

    def _known_unknown(self, key: Key) -> bool:
        expires_at = self._unknown.get(key)
        if expires_at is None:
            return False
        if self._clock() < expires_at:
            return True
        del self._unknown[key]
        return False

    def _remember_unknown(self, key: Key) -> None:
        now = self._clock()
        # Entries expire in insertion order; drop the expired ones from the
        # front. The rate limit bounds how many can be alive at once.
        for old_key, expires_at in list(self._unknown.items()):
            if expires_at > now:
                break
            del self._unknown[old_key]
        self._unknown.pop(key, None)
        self._unknown[key] = now + self._negative_ttl_s

    def _note_skipped(self) -> None:
        self._skipped += 1
        now = self._clock()
        if self._warned_at is not None and now - self._warned_at < (
            LIMIT_WARNING_INTERVAL_S
        ):
            return
        log.warning(
            "fetch-on-miss rate limit reached: %d lookup(s) answered unknown"
            " without asking the Billing API",
            self._skipped,
        )
        self._warned_at = now
        self._skipped = 0
