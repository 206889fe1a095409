"""The webhook listener: authenticate, parse, record, answer.

Checks run in a fixed order (size, authentication, JSON, event type, shop id),
and nothing is answered 2xx before the database has committed it.

Like the lookup listener, it runs on aiohttp's low-level server and matches
its two routes itself: at a few thousand deliveries a second, an
Application's router and handler chain are a measurable share of each one.
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
from aiohttp import web

from . import log
from .app import Sidecar, error_response, json_response, path_parameter
from .auth import delivery_id_header
from .events import Event, EventError, parse_event
from .storage import (
    Delivery,
    StorageUnavailable,
    record_delivery,
    record_quarantine,
)

# Delivery ids become log fields and database keys: printable ASCII, no spaces.
_DELIVERY_ID = re.compile(r"[\x21-\x7e]{1,200}")
RETRY_AFTER_S = "5"
# The two routes: POST /webhooks, and POST /webhooks/<type> for the earlier
# body dialect. A type is one path segment, as aiohttp's router reads one.
_ROUTE = re.compile(r"/webhooks(?:/([^{}/]+))?")


def create_server(
    sidecar: Sidecar, in_flight: InFlight, **handler_options: Any
) -> web.Server:
    """The webhook listener's request handler, on aiohttp's low-level server."""
    limit = sidecar.settings.max_body_bytes
    max_in_flight = sidecar.settings.max_webhook_connections
    loop = asyncio.get_running_loop()

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        route = _ROUTE.fullmatch(request.rel_url.path_safe)
        if route is None:
            return error_response(404, "Not Found")
        if request.method != "POST":
            return error_response(405, "Method Not Allowed", {"Allow": "POST"})
        url_event_type = route[1]
        if url_event_type is not None:
            url_event_type = path_parameter(url_event_type)
        # Each request in progress holds a connection; capping them keeps a
        # flood of slow senders from tying up memory and the writer queue.
        # Connections that have not finished sending their headers are closed
        # by the keep-alive timeout instead.
        if in_flight.count >= max_in_flight:
            log.webhook.warning(
                "refused a delivery: %d already in progress", max_in_flight
            )
            return error_response(
                503, "too many deliveries in progress", {"Retry-After": RETRY_AFTER_S}
            )
        with in_flight:
            return await receive(sidecar, request, url_event_type)

    def make_request(
        message: Any, payload: Any, protocol: Any, writer: Any, task: Any
    ) -> web.BaseRequest:
        # The Application would set this from client_max_size; here each
        # request carries it, so that read() refuses a longer body.
        return web.BaseRequest(
            message,
            payload,
            protocol,
            writer,
            task,
            loop,
            client_max_size=limit,
        )

    return web.Server(handle, request_factory=make_request, **handler_options)


async def receive(
    sidecar: Sidecar, request: web.BaseRequest, url_event_type: str | None
) -> web.Response:
    started = time.perf_counter()
    received_at = int(sidecar.clock())

    limit = sidecar.settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        return _too_large(sidecar, limit)
    try:
        if request.content.is_eof():
            # All of it has arrived, so the read cannot be slow.
            body = await request.read()
        else:
            async with asyncio.timeout(sidecar.settings.read_timeout_seconds):
                body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _too_large(sidecar, limit)
    except TimeoutError:
        log.webhook.warning("refused a delivery whose body arrived too slowly")
        return error_response(408, "the body did not arrive in time")
    except ConnectionResetError:
        # Nobody is left to answer; the sender will retry the whole delivery.
        log.webhook.warning("a sender closed its connection before its body arrived")
        return error_response(400, "the connection closed before the body arrived")

    auth = sidecar.authenticator.check(request.headers, body)
    if not auth.ok:
        sidecar.metrics.auth_failures.labels(auth.method).inc()
        log.webhook.warning("refused a delivery: %s", auth.reason)
        return error_response(401, auth.reason)

    delivery_id = delivery_id_header(request.headers)
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
        return error_response(
            503, "storage unavailable; retry later", {"Retry-After": RETRY_AFTER_S}
        )

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
    return json_response({"result": outcome.result, "delivery_id": delivery_id}, status)


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
) -> web.Response:
    try:
        await sidecar.writer.submit(
            lambda conn: record_quarantine(
                conn, delivery_id, received_at, status, reason, body
            )
        )
    except StorageUnavailable as exc:
        log.webhook.error("refused delivery %s not kept: %s", delivery_id, exc)
        return error_response(
            503, "storage unavailable; retry later", {"Retry-After": RETRY_AFTER_S}
        )
    sidecar.metrics.count_delivery("other", f"rejected_{status}")
    log.webhook.warning("quarantined delivery %s: %s", delivery_id, reason)
    return error_response(status, reason)


def _too_large(sidecar: Sidecar, limit: int) -> web.Response:
    sidecar.metrics.count_delivery("other", "rejected_413")
    log.webhook.warning("refused a delivery larger than %d bytes", limit)
    return error_response(413, f"the body is larger than {limit} bytes")


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

    def __enter__(self) -> None:
        self.count += 1
        self._idle.clear()

    def __exit__(self, *exc_info: object) -> None:
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
