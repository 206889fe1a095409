"""Each entitlement row's copy of its shop's customer flag stays true.

Lookups read `entitlements.customer_deleted` instead of joining `customers`,
so the triggers in schema.sql must keep the copy equal to the shop's
`customers.deleted` (0 when it has no row) after any write to either table,
in any order, whether the sidecar makes it or an operator in sqlite3 does.
"""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.storage import open_database

SHOPS = ("shop-a", "shop-b", "shop-c")
PRODUCTS = ("mod-a", "mod-b")

_shop = st.sampled_from(SHOPS)
_flag = st.sampled_from((0, 1))

# Each write is one SQL statement and its parameters, drawn as a whole.
_WRITES = st.one_of(
    st.tuples(
        st.just(
            "INSERT INTO entitlements (shop_id, product, status, version, delivery_id)"
            " VALUES (?, ?, 'active', 1, 'd')"
            " ON CONFLICT DO UPDATE SET status = 'paused'"
        ),
        st.tuples(_shop, st.sampled_from(PRODUCTS)),
    ),
    st.tuples(
        # A writer that sets the copy itself, wrongly or not, on insert.
        st.just(
            "INSERT OR IGNORE INTO entitlements (shop_id, product, status, version,"
            " delivery_id, customer_deleted) VALUES (?, ?, 'active', 1, 'd', ?)"
        ),
        st.tuples(_shop, st.sampled_from(PRODUCTS), _flag),
    ),
    st.tuples(
        st.just("DELETE FROM entitlements WHERE shop_id = ? AND product = ?"),
        st.tuples(_shop, st.sampled_from(PRODUCTS)),
    ),
    st.tuples(
        st.just(
            "INSERT INTO customers (shop_id, deleted, version, delivery_id)"
            " VALUES (?, ?, 1, 'd')"
            " ON CONFLICT (shop_id) DO UPDATE SET deleted = excluded.deleted"
        ),
        st.tuples(_shop, _flag),
    ),
    st.tuples(
        st.just(
            "INSERT OR REPLACE INTO customers (shop_id, deleted, version, delivery_id)"
            " VALUES (?, ?, 2, 'd')"
        ),
        st.tuples(_shop, _flag),
    ),
    st.tuples(
        st.just("UPDATE customers SET deleted = ? WHERE shop_id = ?"),
        st.tuples(_flag, _shop),
    ),
    st.tuples(
        st.just("UPDATE OR IGNORE customers SET shop_id = ? WHERE shop_id = ?"),
        st.tuples(_shop, _shop),
    ),
    st.tuples(st.just("DELETE FROM customers WHERE shop_id = ?"), st.tuples(_shop)),
    st.tuples(st.just("DELETE FROM customers"), st.just(())),
)


def _wrong_copies(conn: sqlite3.Connection) -> list[tuple[str, str, int, int]]:
    return conn.execute(
        "SELECT shop_id, product, customer_deleted,"
        " coalesce((SELECT deleted FROM customers AS c"
        " WHERE c.shop_id = e.shop_id), 0) AS deleted"
        " FROM entitlements AS e WHERE customer_deleted IS NOT deleted"
    ).fetchall()


@settings(max_examples=200, deadline=None)
@given(writes=st.lists(_WRITES, min_size=1, max_size=12))
def test_copy_matches_customers_after_any_writes(
    writes: list[tuple[str, tuple[object, ...]]],
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        conn = open_database(str(Path(directory) / "sidecar.db"))
        try:
            for sql, parameters in writes:
                conn.execute(sql, parameters)
                assert _wrong_copies(conn) == [], (sql, parameters)
        finally:
            conn.close()


def test_copy_is_checked_by_the_invariant(tmp_path: Path) -> None:
    # The property above only means something if a wrong copy is caught.
    conn = open_database(str(tmp_path / "sidecar.db"))
    conn.execute(
        "INSERT INTO entitlements (shop_id, product, status, version, delivery_id)"
        " VALUES ('shop-a', 'mod-a', 'active', 1, 'd')"
    )
    conn.execute("UPDATE entitlements SET customer_deleted = 1")

    assert _wrong_copies(conn) == [("shop-a", "mod-a", 1, 0)]
