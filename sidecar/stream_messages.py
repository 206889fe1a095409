"""Deliveries as messages of the shared stream, and back.

A message holds the raw body, and in headers everything else that a host would
otherwise take from the request or from its own clock: the delivery id, the
time of receipt, the fallback version (signed webhook-timestamp, else time of
receipt), the event type from the URL and the receiving host's default
product. Every host parses the same message with the same code, so every host
records the same row for it. Signature headers do not travel: the receiving
host has checked them, and a host catching up hours later would find their
timestamps outside the 5-minute window.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, unquote

from .events import EventError, parse_event
from .storage import Delivery
from .webhook import decode_body

# Raised when the meaning of a header changes; older hosts then stop rather
# than misread what a newer host wrote.
FORMAT = "1"

# JetStream drops a second message with the same id within its duplicate window.
MSG_ID = "Nats-Msg-Id"
FORMAT_HEADER = "Sidecar-Format"
RECEIVED_AT = "Sidecar-Received-At"
FALLBACK_VERSION = "Sidecar-Fallback-Version"
URL_EVENT_TYPE = "Sidecar-Url-Event-Type"
DEFAULT_PRODUCT = "Sidecar-Default-Product"
SOURCE = "Sidecar-Source"


class NewerFormat(Exception):
    """The message was written by a newer version of the sidecar."""


@dataclass(frozen=True)
class Refusal:
    """A message that cannot be applied, kept in quarantine like a refused body."""

    delivery_id: str
    received_at: int
    status: int
    reason: str
    body: bytes


def message_headers(
    delivery: Delivery, url_event_type: str | None, default_product: str
) -> dict[str, str]:
    """The headers that let any host record `delivery` exactly as this one would."""
    headers = {
        MSG_ID: delivery.delivery_id,
        FORMAT_HEADER: FORMAT,
        RECEIVED_AT: str(delivery.received_at),
        FALLBACK_VERSION: str(delivery.fallback_version),
        DEFAULT_PRODUCT: default_product,
        SOURCE: delivery.source,
    }
    if url_event_type is not None:
        # The URL segment arrives percent-decoded and may hold any character,
        # CR and LF included, which a header line cannot.
        headers[URL_EVENT_TYPE] = quote(url_event_type, safe="")
    return headers


def read_message(
    headers: Mapping[str, str] | None, body: bytes, stored_at: int
) -> Delivery | Refusal:
    """Rebuild the delivery a message holds; raise NewerFormat if it is not ours."""
    headers = headers or {}
    message_format = headers.get(FORMAT_HEADER)
    if message_format is None:
        # Published to the subject by something other than a sidecar.
        return Refusal(
            hashlib.sha256(body).hexdigest(),
            stored_at,
            400,
            "a stream message without the sidecar's headers",
            body,
        )
    if message_format != FORMAT:
        raise NewerFormat(f"stream message format {message_format!r}")

    delivery_id = headers.get(MSG_ID) or hashlib.sha256(body).hexdigest()
    received_at = _integer(headers.get(RECEIVED_AT))
    fallback_version = _integer(headers.get(FALLBACK_VERSION))
    default_product = headers.get(DEFAULT_PRODUCT)
    if received_at is None or fallback_version is None or not default_product:
        return Refusal(
            delivery_id, stored_at, 400, "a stream message with bad headers", body
        )

    url_event_type = headers.get(URL_EVENT_TYPE)
    try:
        event = parse_event(
            decode_body(body),
            None if url_event_type is None else unquote(url_event_type),
            default_product,
        )
    except EventError as exc:
        return Refusal(delivery_id, received_at, exc.status, exc.reason, body)
    return Delivery(
        delivery_id=delivery_id,
        received_at=received_at,
        source=headers.get(SOURCE, "webhook"),
        event=event,
        fallback_version=fallback_version,
        body=body,
    )


def _integer(text: str | None) -> int | None:
    if text is None or not text.isascii() or not text.lstrip("-").isdigit():
        return None
    return int(text)
