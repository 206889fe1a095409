"""The webhook listener: authenticate, parse, record, answer.

Checks run in a fixed order (size, authentication, JSON, event type, shop id),
and nothing is answered 2xx before the database has committed it. The HTTP
side (reading requests, the body limit, timeouts, keep-alive) is
webhook_server.py's; this module decides what each request gets.
"""

from __future__ import annotations

import asyncio
import codecs
import hashlib
import json
import re
import time
from typing import Any

import pydantic_core
from multidict import CIMultiDict

from . import log
from .app import Sidecar, path_parameter
from .auth import delivery_id_header
from .events import Event, EventError, parse_event
from .storage import (
    Delivery,
    StorageUnavailable,
    record_delivery,
    record_quarantine,
)
from .webhook_server import Reply, Request, error_reply, json_reply

# Delivery ids become log fields and database keys: printable ASCII, no spaces.
_DELIVERY_ID = re.compile(r"[\x21-\x7e]{1,200}")
_RETRY_AFTER = (("Retry-After", "5"),)
# The two routes: POST /webhooks, and POST /webhooks/<type> for the earlier
# body dialect. A type is one path segment, as aiohttp's router reads one.
_ROUTE = re.compile(r"/webhooks(?:/([^{}/]+))?")


class Deliveries:
    """The webhook listener's side of each request: admit it, then record it."""

    def __init__(self, sidecar: Sidecar, in_flight: InFlight) -> None:
        self.sidecar = sidecar
        self.in_flight = in_flight
        self.limit = sidecar.settings.max_body_bytes
        self.max_in_flight = sidecar.settings.max_webhook_connections

    def admit(self, method: str, path: str, headers: CIMultiDict[str]) -> Reply | None:
        if _ROUTE.fullmatch(path) is None:
            return error_reply(404, "Not Found")
        if method != "POST":
            return error_reply(405, "Method Not Allowed", (("Allow", "POST"),))
        # Each request in progress holds its body in memory and, soon, a place
        # in the writer's queue; capping them keeps a flood of slow senders
        # from tying up either. Connections still sending their headers are
        # closed by the read timeout instead.
        if self.in_flight.count >= self.max_in_flight:
            log.webhook.warning(
                "refused a delivery: %d already in progress", self.max_in_flight
            )
            return error_reply(503, "too many deliveries in progress", _RETRY_AFTER)
        self.in_flight.acquire()
        return None

    def done(self) -> None:
        self.in_flight.release()

    def too_large(self) -> Reply:
        self.sidecar.metrics.count_delivery("other", "rejected_413")
        log.webhook.warning("refused a delivery larger than %d bytes", self.limit)
        return error_reply(413, f"the body is larger than {self.limit} bytes")

    async def handle(self, request: Request) -> Reply:
        route = _ROUTE.fullmatch(request.path)
        assert route is not None, "admit() refuses any other path"
        url_event_type = route[1]
        if url_event_type is not None:
            url_event_type = path_parameter(url_event_type)
        return await receive(self.sidecar, request, url_event_type)


async def receive(
    sidecar: Sidecar, request: Request, url_event_type: str | None
) -> Reply:
    started = time.perf_counter()
    received_at = int(sidecar.clock())
    headers = request.headers
    body = request.body

    auth = sidecar.authenticator.check(headers, body)
    if not auth.ok:
        sidecar.metrics.auth_failures.labels(auth.method).inc()
        log.webhook.warning("refused a delivery: %s", auth.reason)
        return error_reply(401, auth.reason)

    delivery_id = delivery_id_header(headers)
    if delivery_id is None:
        delivery_id = hashlib.sha256(body).hexdigest()
    elif not _DELIVERY_ID.fullmatch(delivery_id):
        return await _quarantine(
            sidecar,
            hashlib.sha256(body).hexdigest(),
            received_at,
            400,
            "webhook-id must be 1 to 200 printable ASCII characters",
            body,
        )

    try:
        event = parse_event(decode_body(body), url_event_type, sidecar.settings.product)
    except EventError as exc:
        return await _quarantine(
            sidecar, delivery_id, received_at, exc.status, exc.reason, body
        )

    delivery = Delivery(
        delivery_id=delivery_id,
        received_at=received_at,
        source="webhook",
        event=event,
        fallback_version=_fallback_version(auth.signed_timestamp, sidecar),
        body=body,
    )
    try:
        if sidecar.cluster is None:
            outcome = await sidecar.writer.submit(
                lambda conn: record_delivery(conn, delivery)
            )
        else:
            # Every host, this one included, applies it from the shared stream.
            outcome = await sidecar.cluster.publish(delivery, url_event_type)
    except StorageUnavailable as exc:
        log.webhook.error("delivery %s not stored: %s", delivery_id, exc)
        return error_reply(503, "storage unavailable; retry later", _RETRY_AFTER)

    if outcome.result == "applied":
        sidecar.metrics.note_applied(sidecar.clock())
    sidecar.metrics.count_delivery(event.event_type, outcome.result)
    # The line is written on the next pass of the event loop, once this answer
    # is on its way: when a commit releases many deliveries at once, each
    # answer then leaves without waiting for the log lines of those before it,
    # and its sender can send again sooner.
    asyncio.get_running_loop().call_soon(
        _log_delivery,
        delivery_id,
        event,
        outcome.result,
        (time.perf_counter() - started) * 1000,
    )
    # 'accepted': in the shared stream, not yet applied on this host.
    status = 202 if outcome.result == "accepted" else 200
    return json_reply({"result": outcome.result, "delivery_id": delivery_id}, status)


def decode_body(body: bytes) -> Any:
    """Decode a webhook body as UTF-8 JSON; raise EventError with a 400."""
    # JSON on the wire is UTF-8 (RFC 8259). json.loads would also take UTF-16
    # and UTF-8-encoded surrogates, whose strings SQLite then cannot store.
    # A leading byte order mark is allowed, and dropped by hand: the
    # "utf-8-sig" codec would take the slower, pure-Python decoding path.
    if body.startswith(codecs.BOM_UTF8):
        body = body[len(codecs.BOM_UTF8) :]
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise EventError(400, "the body is not valid UTF-8") from None
    # pydantic-core's parser reads a Billing body in half the time json.loads
    # takes. It refuses a few texts that json.loads reads, such as a lone
    # surrogate escape in a field the sidecar never looks at, so what it
    # refuses goes to json.loads, which decides what is JSON.
    try:
        return pydantic_core.from_json(text, cache_strings="keys")
    except ValueError:
        pass
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise EventError(400, "the body is not valid JSON") from None


def _fallback_version(signed_timestamp: int | None, sidecar: Sidecar) -> int:
    if signed_timestamp is not None:
        return signed_timestamp * 1000
    return int(sidecar.clock() * 1000)


async def _quarantine(
    sidecar: Sidecar,
    delivery_id: str,
    received_at: int,
    status: int,
    reason: str,
    body: bytes,
) -> Reply:
    try:
        await sidecar.writer.submit(
            lambda conn: record_quarantine(
                conn, delivery_id, received_at, status, reason, body
            )
        )
    except StorageUnavailable as exc:
        log.webhook.error("refused delivery %s not kept: %s", delivery_id, exc)
        return error_reply(503, "storage unavailable; retry later", _RETRY_AFTER)
    sidecar.metrics.count_delivery("other", f"rejected_{status}")
    log.webhook.warning("quarantined delivery %s: %s", delivery_id, reason)
    return error_reply(status, reason)


def _log_delivery(
    delivery_id: str, event: Event, result: str, duration_ms: float
) -> None:
    fields = None
    if log.fields_shown:
        fields = {
            "fields": {
                "delivery_id": delivery_id,
                "event_type": event.event_type,
                "shop_id": event.shop_id,
                "product": event.product,
                "result": result,
                "duration_ms": round(duration_ms, 2),
            }
        }
    log.webhook.info(
        "delivery %s type=%s shop=%s product=%s result=%s duration_ms=%.1f",
        delivery_id,
        event.event_type,
        event.shop_id or "-",
        event.product or "-",
        result,
        duration_ms,
        extra=fields,
    )


class InFlight:
    """Counts deliveries being handled, to cap them and to drain them on stop."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def acquire(self) -> None:
        self.count += 1
        self._idle.clear()

    def release(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no delivery is being handled; return False on timeout."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True
