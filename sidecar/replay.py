"""Rebuild the entitlement and customer tables from the stored deliveries.

Each delivery row keeps the parsed facts of its event, so the rebuild works
even after bodies have been dropped at the end of the retention period. Since
the ordering rule makes the result independent of arrival order, a rebuild
must reproduce the live tables exactly; any difference is reported.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass

from .events import CustomerState, Event, Kind, SubscriptionState
from .storage import apply_event

_TABLES = {
    "entitlements": (
        "SELECT shop_id, product, plan, status, trial_end, current_term_end,"
        " updated_at, version, customer_deleted FROM entitlements"
    ),
    "customers": "SELECT shop_id, '', deleted, version FROM customers",
}


@dataclass(frozen=True)
class Difference:
    table: str
    key: tuple[str, str]
    before: tuple[object, ...] | None
    after: tuple[object, ...] | None


def rebuild(conn: sqlite3.Connection, dry_run: bool = False) -> list[Difference]:
    """Rebuild both tables in one transaction; return what differs from before."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        before = {table: _snapshot(conn, sql) for table, sql in _TABLES.items()}
        conn.execute("DELETE FROM entitlements")
        conn.execute("DELETE FROM customers")
        for delivery_id, version, event in _stored_events(conn):
            apply_event(conn, event, version, delivery_id)
        after = {table: _snapshot(conn, sql) for table, sql in _TABLES.items()}
        conn.execute("ROLLBACK" if dry_run else "COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise

    differences = []
    for table in _TABLES:
        keys = sorted(before[table].keys() | after[table].keys())
        for key in keys:
            old, new = before[table].get(key), after[table].get(key)
            if old != new:
                differences.append(Difference(table, key, old, new))
    return differences


def _snapshot(
    conn: sqlite3.Connection, sql: str
) -> dict[tuple[str, str], tuple[object, ...]]:
    return {(row[0], row[1]): tuple(row[2:]) for row in conn.execute(sql)}


def _stored_events(conn: sqlite3.Connection) -> Iterator[tuple[str, int, Event]]:
    rows = conn.execute(
        "SELECT delivery_id, version, event_type, kind, shop_id, product, plan,"
        " status, trial_end, current_term_end, updated_at, customer_deleted"
        " FROM deliveries WHERE kind IN ('subscription', 'customer')"
        " ORDER BY received_at, rowid"
    )
    for (
        delivery_id,
        version,
        event_type,
        kind,
        shop_id,
        product,
        plan,
        status,
        trial_end,
        current_term_end,
        updated_at,
        customer_deleted,
    ) in rows.fetchall():
        if kind == Kind.SUBSCRIPTION.value:
            event = Event(
                event_type=event_type,
                kind=Kind.SUBSCRIPTION,
                shop_id=shop_id,
                product=product,
                subscription=SubscriptionState(
                    plan=plan,
                    status=status,
                    trial_end=trial_end,
                    current_term_end=current_term_end,
                    updated_at=updated_at,
                    resource_version=version,
                ),
            )
        else:
            event = Event(
                event_type=event_type,
                kind=Kind.CUSTOMER,
                shop_id=shop_id,
                customer=CustomerState(
                    deleted=bool(customer_deleted), resource_version=version
                ),
            )
        yield delivery_id, version, event
