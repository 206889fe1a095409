"""Turn a webhook body of either dialect into the facts the sidecar acts on.

PrestaShop Billing has sent two shapes of body. The envelope carries its type
inside (`{"eventType": ..., "data": {...}}`); the earlier draft is a bare
`{"customer": ..., "subscription": ...}` whose type comes from the URL or an
`event_type` field. Both embed Chargebee objects from either catalogue version.
Parsing never looks at fields it does not need, so unknown fields never cause a
rejection, and it rejects a field it needs only when that field has a wrong type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeGuard

from .settings import PRODUCT_PATTERN, SHOP_ID_PATTERN

# Seconds up to the year 9999, and milliseconds for the same range: anything
# larger is garbage, and SQLite integers are 64-bit.
MAX_SECONDS = 253_402_300_799
MAX_MILLIS = MAX_SECONDS * 1000 + 999


class Kind(Enum):
    SUBSCRIPTION = "subscription"
    CUSTOMER = "customer"
    IGNORED = "ignored"


SUBSCRIPTION_EVENTS = {
    "subscription.created",
    "subscription.updated",
    "subscription.status-updated",
    "subscription.cancelled",
    # Payment events carry the subscription as it stands.
    "payment.succeeded",
    "payment.failed",
}
CUSTOMER_EVENTS = {
    "customer.created",
    "customer.updated",
    "customer-billing-address.updated",
}
_EVENT_NAME = re.compile(r"[\x21-\x7e]{1,200}")
_CANONICAL = {
    re.sub(r"[-_]", ".", name): name for name in SUBSCRIPTION_EVENTS | CUSTOMER_EVENTS
}


class EventError(ValueError):
    """The body cannot be used; `status` is the HTTP answer (400 or 422)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def normalise_event_type(name: str) -> str:
    """Map any spelling of a known event name to its canonical form.

    Case is ignored, `.`, `_` and `-` are one separator, and `canceled` is
    `cancelled`. Unknown names come back lower-cased with `.` separators.
    """
    key = re.sub(r"[-_.]", ".", name.strip().lower()).replace("canceled", "cancelled")
    return _CANONICAL.get(key, key)


def event_kind(event_type: str) -> Kind:
    if event_type in SUBSCRIPTION_EVENTS:
        return Kind.SUBSCRIPTION
    if event_type in CUSTOMER_EVENTS:
        return Kind.CUSTOMER
    return Kind.IGNORED


# What a body is read into. Unlike most of the code's records these are not
# frozen, only never changed: some are built for every delivery, and a frozen
# dataclass's __init__ takes several times as long as a plain one's.
@dataclass(slots=True)
class SubscriptionState:
    """What a subscription event says about one (shop, product)."""

    plan: str | None
    status: str
    trial_end: int | None
    current_term_end: int | None
    updated_at: int | None
    resource_version: int | None


@dataclass(slots=True)
class CustomerState:
    deleted: bool
    resource_version: int | None


@dataclass(slots=True)
class Event:
    """A parsed delivery. `subscription`/`customer` are set according to `kind`."""

    event_type: str
    kind: Kind
    shop_id: str | None = None
    product: str | None = None
    subscription: SubscriptionState | None = None
    customer: CustomerState | None = None


def parse_event(body: Any, url_event_type: str | None, default_product: str) -> Event:
    """Read one decoded JSON body; raise EventError when it cannot be used."""
    if not isinstance(body, dict):
        raise EventError(400, "the body must be a JSON object")

    # The event type is checked before anything else in the body, so an event
    # the sidecar does not act on is ignored whatever else it carries.
    envelope = "eventType" in body or "data" in body
    raw_type = body.get("eventType" if envelope else "event_type", url_event_type)
    event_type = _event_type(raw_type)
    kind = event_kind(event_type)
    if kind is Kind.IGNORED:
        return Event(event_type=event_type, kind=kind)

    if envelope:
        data = body.get("data")
        if not isinstance(data, dict):
            raise EventError(422, "data must be an object")
        customer = _object(data, "customer", "data.")
        shop_id = _first_present(
            ("data.shopId", data.get("shopId")),
            ("data.customer.cf_shop_id", (customer or {}).get("cf_shop_id")),
            ("data.customer.ps_shop_id", (customer or {}).get("ps_shop_id")),
        )
        module_id = data.get("module_id")
        container = data
        prefix = "data."
    else:
        customer = _object(body, "customer", "")
        shop_id = _first_present(
            ("customer.ps_shop_id", (customer or {}).get("ps_shop_id")),
        )
        module_id = None
        container = body
        prefix = ""

    if shop_id is None:
        raise EventError(422, "no shop id: expected data.shopId or customer.ps_shop_id")

    if kind is Kind.CUSTOMER:
        if customer is None:
            raise EventError(422, f"a customer event needs {prefix}customer")
        return Event(
            event_type=event_type,
            kind=kind,
            shop_id=shop_id,
            customer=_customer_state(customer, prefix + "customer"),
        )

    subscription = _object(container, "subscription", prefix)
    if subscription is None:
        raise EventError(422, f"a subscription event needs {prefix}subscription")
    return Event(
        event_type=event_type,
        kind=kind,
        shop_id=shop_id,
        product=_product(subscription, module_id, default_product, prefix),
        subscription=subscription_state(subscription, prefix + "subscription"),
    )


def _event_type(raw_type: Any) -> str:
    if raw_type is None:
        raise EventError(422, "no event type: send eventType, or POST /webhooks/<type>")
    if not isinstance(raw_type, str) or not _EVENT_NAME.fullmatch(raw_type.strip()):
        raise EventError(422, "the event type must be 1 to 200 printable characters")
    return normalise_event_type(raw_type)


def subscription_state(sub: dict[str, Any], where: str) -> SubscriptionState:
    """Read a Chargebee subscription of either catalogue version."""
    status = sub.get("status")
    if not _is_text(status, 64) or not status.strip():
        raise EventError(422, f"{where}.status must be a non-empty string")
    plan_entry = _plan_entry(sub, where)

    plan = _string(sub, "plan_id", where)
    if plan is None and plan_entry is not None:
        plan = _string(plan_entry, "item_price_id", where + ".items[plan]")
        if plan is None:
            plan = _string(plan_entry, "item_id", where + ".items[plan]")

    trial_end = _seconds(sub, "trial_end", where)
    if trial_end is None and plan_entry is not None:
        trial_end = _seconds(plan_entry, "trial_end", where + ".items[plan]")

    return SubscriptionState(
        plan=plan,
        status=status.strip().lower().replace("canceled", "cancelled"),
        trial_end=trial_end,
        current_term_end=_seconds(sub, "current_term_end", where),
        updated_at=_seconds(sub, "updated_at", where),
        resource_version=_integer(sub, "resource_version", where, MAX_MILLIS),
    )


def _customer_state(customer: dict[str, Any], where: str) -> CustomerState:
    # Chargebee writes null for a flag it has no value for.
    deleted = customer.get("deleted")
    if deleted is None:
        deleted = False
    if not isinstance(deleted, bool):
        raise EventError(422, f"{where}.deleted must be true or false")
    version = _integer(customer, "resource_version", where, MAX_MILLIS)
    if version is None:
        updated_at = _seconds(customer, "updated_at", where)
        version = None if updated_at is None else updated_at * 1000
    return CustomerState(deleted=deleted, resource_version=version)


def _plan_entry(sub: dict[str, Any], where: str) -> dict[str, Any] | None:
    for key in ("subscription_items", "items"):
        entries = sub.get(key)
        if entries is None:
            continue
        if not isinstance(entries, list):
            raise EventError(422, f"{where}.{key} must be a list")
        for entry in entries:
            if not isinstance(entry, dict):
                raise EventError(422, f"{where}.{key} must hold objects")
            item_type = entry.get("item_type") or entry.get("type")
            if item_type == "plan":
                return entry
    return None


def _product(sub: dict[str, Any], module_id: Any, default: str, prefix: str) -> str:
    meta = sub.get("meta_data")
    if meta is not None and not isinstance(meta, dict):
        raise EventError(422, f"{prefix}subscription.meta_data must be an object")
    candidates = []
    if meta is not None and meta.get("module") is not None:
        candidates.append((f"{prefix}subscription.meta_data.module", meta["module"]))
    if module_id is not None:
        candidates.append((f"{prefix}module_id", module_id))
    for where, value in candidates:
        if not isinstance(value, str) or not PRODUCT_PATTERN.fullmatch(value):
            raise EventError(
                422, f"{where} must be 1 to 64 characters of A-Z a-z 0-9 _ . -"
            )
        return value
    return default


def _first_present(*candidates: tuple[str, Any]) -> str | None:
    for where, value in candidates:
        if value is None:
            continue
        # Shop ids are strings, but a numeric id is the same shop.
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            value = str(value)
        if not isinstance(value, str) or not SHOP_ID_PATTERN.fullmatch(value):
            raise EventError(
                422, f"{where} must be 1 to 64 characters of A-Z a-z 0-9 _ -"
            )
        return value
    return None


def _object(container: dict[str, Any], key: str, prefix: str) -> dict[str, Any] | None:
    value = container.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise EventError(422, f"{prefix}{key} must be an object")
    return value


def _string(container: dict[str, Any], key: str, where: str) -> str | None:
    value = container.get(key)
    if value is None:
        return None
    if not _is_text(value, 200):
        raise EventError(422, f"{where}.{key} must be a string")
    return value


def _is_text(value: Any, max_length: int) -> TypeGuard[str]:
    """Tell whether `value` is a string that can be stored and shown as UTF-8.

    JSON escapes can spell lone surrogates (`"\\ud800"`), which Python accepts
    but SQLite cannot store: such a string is a wrong value, not a storage fault.
    """
    if not isinstance(value, str) or len(value) > max_length:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _seconds(container: dict[str, Any], key: str, where: str) -> int | None:
    return _integer(container, key, where, MAX_SECONDS)


def _integer(
    container: dict[str, Any], key: str, where: str, maximum: int
) -> int | None:
    value = container.get(key)
    if value is None:
        return None
    # JSON numbers may arrive as 1.7e9 from some serialisers; bool is not a number.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise EventError(422, f"{where}.{key} must be an integer")
    if not 0 <= value <= maximum:
        raise EventError(422, f"{where}.{key} is out of range")
    return value
