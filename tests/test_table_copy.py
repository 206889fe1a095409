"""The in-memory copy of the table answers exactly as SQLite would.

Each test compares lookups answered through the copy with lookups answered by
a second `Answers` that has no copy and reads SQLite for every lookup, on the
same database file. A trace of the statements the first one runs shows that
the copy, not SQLite, gave the answer.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conftest import StartSidecar, subscription_event, wait_for
from sidecar.answers import EXTERNAL_CHECK_S, Answers
from sidecar.maintenance import Maintenance
from sidecar.storage import connect, open_database
from sidecar.table_copy import CATCH_UP_LIMIT

PRODUCT = "mymodule"
NOW = 1_800_000_000
GRACE = 3600
UUID_SHOP = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"

# Rows as the sidecar writes them, and rows as only an operator in sqlite3
# could: values of a type or size the column does not promise.
ROWS = [
    (UUID_SHOP, PRODUCT, "pro-monthly", "active", None, NOW + 86400, NOW - 10),
    (UUID_SHOP.upper(), PRODUCT, "free", "cancelled", None, None, None),
    ("shop-trial", PRODUCT, None, "in_trial", NOW + 60, None, NOW),
    ("shop-trial-over", PRODUCT, None, "in_trial", NOW - GRACE - 1, None, NOW),
    ("shop-ending", PRODUCT, "pro", "non_renewing", None, NOW - 5, NOW),
    ("shop-ending", "othermodule", "pro", "active", None, None, NOW),
    ("shop-new-status", PRODUCT, "pro", "in_dunning", None, None, NOW),
    ("shop-date-as-text", PRODUCT, "pro", "active", None, None, "2027-01-01"),
    ("shop-negative", PRODUCT, "pro", "in_trial", -5, None, NOW),
    ("shop-after-2106", PRODUCT, "pro", "in_trial", 2**32 + 7, None, NOW),
    ("shop-real", PRODUCT, "pro", "non_renewing", None, NOW + 0.5, NOW),
    ("shop-blob-plan", PRODUCT, b"\x00pro", "active", None, None, NOW),
    ("shöp-ünïcode", PRODUCT, "pro", "active", None, None, NOW),
    ("shop-deleted-customer", PRODUCT, "pro", "active", None, None, NOW),
]
# Not copied: text, negative, too large and real times, and a blob plan.
NOT_COPIED = 5
ABSENT = [
    ("shop-missing", PRODUCT),
    ("shop-trial", "othermodule"),
    ("shop-trial", "no-such-product"),
    (UUID_SHOP.replace("0a", "0b"), PRODUCT),
]


def _insert(conn: sqlite3.Connection, rows: list[tuple[object, ...]]) -> None:
    conn.executemany(
        "INSERT INTO entitlements (shop_id, product, plan, status, trial_end,"
        " current_term_end, updated_at, version, delivery_id)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, 1, 'test')",
        rows,
    )


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "sidecar.db"
    conn = open_database(str(path))
    _insert(conn, ROWS)
    conn.execute(
        "INSERT INTO customers (shop_id, deleted, version, delivery_id)"
        " VALUES ('shop-deleted-customer', 1, 1, 'test')"
    )
    conn.close()
    return path


class Lookups:
    """Two ways to answer lookups on one file: through the copy, and SQLite only."""

    def __init__(self, path: Path, commits: list[int]) -> None:
        reader = connect(str(path))
        self.table_reads = 0
        reader.set_trace_callback(self._traced)
        # Keeping no answers, both read for every lookup.
        self.copied = Answers(
            reader,
            lambda: commits[0],
            GRACE,
            max_answers=0,
            copy_from=lambda: connect(str(path)),
        )
        self.uncopied = Answers(
            connect(str(path)), lambda: commits[0], GRACE, max_answers=0
        )

    def _traced(self, statement: str) -> None:
        if statement.lstrip().startswith("SELECT plan, status"):
            self.table_reads += 1

    async def load(self) -> None:
        self.copied.start_copy()
        await wait_for(lambda: self.copied.copy_position is not None)

    def assert_same(self, keys: list[tuple[str, str]]) -> None:
        """Each key's lookup answers alike both ways, or fails alike."""
        for shop_id, product in keys:
            copied = _outcome(self.copied, shop_id, product)
            assert copied == _outcome(self.uncopied, shop_id, product)

    def close(self) -> None:
        self.copied.close()
        self.uncopied.close()


def _outcome(answers: Answers, shop_id: str, product: str) -> tuple[int, bytes] | str:
    try:
        found = answers.find(shop_id, product, NOW)
    except sqlite3.DataError as exc:
        # A row the rule cannot read: the lookup answers 503.
        return str(exc)
    return found.status, found.body


@pytest.fixture
async def lookups(database: Path) -> AsyncIterator[Lookups]:
    both = Lookups(database, [0])
    await both.load()
    yield both
    both.close()


def _keys(rows: list[tuple[object, ...]]) -> list[tuple[str, str]]:
    return [(str(row[0]), str(row[1])) for row in rows]


async def test_copy_answers_every_row_as_sqlite_does(lookups: Lookups) -> None:
    lookups.assert_same(_keys(ROWS) + ABSENT)

    # Only the rows the copy cannot hold exactly were read from the table.
    assert lookups.table_reads == NOT_COPIED
    assert lookups.copied.copied_rows == len(ROWS)
    # Of those, a text time and a blob plan are what the rule cannot read.
    unreadable = [
        _outcome(lookups.copied, shop_id, PRODUCT)
        for shop_id in ("shop-date-as-text", "shop-blob-plan")
    ]
    assert unreadable == [
        "an entitlements row's updated_at has the wrong type",
        "an entitlements row's plan has the wrong type",
    ]


async def _after_external_check() -> None:
    await asyncio.sleep(2 * EXTERNAL_CHECK_S)


async def test_copy_follows_writes_of_another_connection(
    database: Path, lookups: Lookups
) -> None:
    other = connect(str(database))
    keys = _keys(ROWS) + ABSENT
    writes = [
        "INSERT INTO entitlements (shop_id, product, status, version, delivery_id)"
        " VALUES ('shop-missing', 'mymodule', 'active', 1, 'x')",
        "UPDATE entitlements SET status = 'paused' WHERE shop_id = 'shop-trial'",
        "UPDATE entitlements SET trial_end = 1e13 WHERE shop_id = 'shop-trial'",
        "UPDATE entitlements SET updated_at = 5 WHERE shop_id = 'shop-date-as-text'",
        "DELETE FROM entitlements WHERE shop_id = 'shop-ending'",
        # A key that changes: the row leaves one shop for another.
        "UPDATE entitlements SET shop_id = 'shop-moved'"
        " WHERE shop_id = 'shop-negative'",
        # The customer's row reaches every product of the shop by trigger.
        "INSERT INTO customers (shop_id, deleted, version, delivery_id)"
        " VALUES ('shop-real', 1, 1, 'x')",
        "DELETE FROM customers WHERE shop_id = 'shop-deleted-customer'",
    ]
    for write in writes:
        other.execute(write)
        await _after_external_check()
        lookups.assert_same([*keys, ("shop-moved", PRODUCT)])

    other.close()
    # Followed change by change: the copy was never loaded again.
    assert lookups.copied.copy_position is not None
    assert lookups.copied.copied_rows == len(ROWS) + 1 - 2


async def test_copy_follows_own_writer_at_once(database: Path) -> None:
    commits = [0]
    both = Lookups(database, commits)
    await both.load()
    other = connect(str(database))
    both.assert_same([("shop-missing", PRODUCT)])

    other.execute(
        "INSERT INTO entitlements (shop_id, product, status, version, delivery_id)"
        " VALUES ('shop-missing', 'mymodule', 'active', 1, 'x')"
    )
    commits[0] += 1
    found = both.copied.find("shop-missing", PRODUCT, NOW)

    assert found.reason == "active"
    other.close()
    both.close()


async def test_many_changes_at_once_load_the_copy_again(
    database: Path, lookups: Lookups
) -> None:
    # More changes than are applied on the event loop: a replay, an import.
    many = [
        (f"shop-bulk-{number}", PRODUCT, "pro", "active", None, None, NOW)
        for number in range(CATCH_UP_LIMIT + 1)
    ]
    other = connect(str(database))
    other.execute("BEGIN")
    _insert(other, many)
    other.execute("COMMIT")
    await _after_external_check()
    sample = _keys(many[:: CATCH_UP_LIMIT // 10]) + _keys(ROWS) + ABSENT

    # While the copy loads again, lookups read SQLite and are just as true.
    lookups.assert_same(sample)
    assert lookups.copied.copy_position is None
    await wait_for(lambda: lookups.copied.copy_position is not None)
    reads = lookups.table_reads
    lookups.assert_same(sample)

    assert lookups.copied.copied_rows == len(ROWS) + len(many)
    assert lookups.table_reads - reads == NOT_COPIED
    other.close()


async def test_changes_deleted_before_the_copy_applied_them_load_it_again(
    database: Path, lookups: Lookups
) -> None:
    other = connect(str(database))
    other.execute(
        "UPDATE entitlements SET status = 'paused' WHERE shop_id = 'shop-trial'"
    )
    # As if something else had pruned the log beyond this copy's position.
    other.execute("DELETE FROM entitlement_changes")
    await _after_external_check()

    lookups.assert_same([("shop-trial", PRODUCT)])
    assert lookups.copied.copy_position is None
    await wait_for(lambda: lookups.copied.copy_position is not None)
    lookups.assert_same(_keys(ROWS))
    assert lookups.copied.find("shop-trial", PRODUCT, NOW + 1).reason == "paused"
    other.close()


async def test_pruning_deletes_only_changes_up_to_the_position(
    database: Path,
) -> None:
    maintenance = Maintenance(str(database), 5000, 30, time.time)
    await maintenance.start()
    other = connect(str(database))
    other.execute("DELETE FROM entitlement_changes")
    other.execute("BEGIN")
    _insert(
        other,
        [(f"shop-{n}", PRODUCT, None, "active", None, None, None) for n in range(2500)],
    )
    other.execute("COMMIT")
    first, last = other.execute(
        "SELECT min(seq), max(seq) FROM entitlement_changes"
    ).fetchone()

    pruned = await maintenance.prune_changes_up_to(first + 2199)

    left = other.execute("SELECT min(seq), count(*) FROM entitlement_changes")
    assert pruned == 2200
    assert left.fetchone() == (first + 2200, last - first - 2199)
    other.close()
    await maintenance.close()


async def test_server_answers_from_the_copy_and_follows_deliveries(
    tmp_path: Path, start_sidecar: StartSidecar
) -> None:
    path = tmp_path / "sidecar.db"
    conn = open_database(str(path))
    _insert(
        conn,
        [(f"shop-{n}", PRODUCT, "pro", "active", None, None, NOW) for n in range(300)],
    )
    conn.close()
    running = await start_sidecar(db=path)

    async def copied_rows() -> float:
        async with running.session.get(f"{running.lookup_url}/metrics") as response:
            for line in (await response.text()).splitlines():
                if line.startswith("sidecar_lookup_copied_rows "):
                    return float(line.split()[1])
        raise AssertionError("no sidecar_lookup_copied_rows in /metrics")

    deadline = time.monotonic() + 10
    while await copied_rows() < 300:
        assert time.monotonic() < deadline, "the copy was not loaded"
        await asyncio.sleep(0.02)

    status, before = await running.get(f"/entitlement/shop-7?product={PRODUCT}")
    stored, result = await running.post(
        subscription_event("shop-7", "cancelled", resource_version=2)
    )
    status_after, after = await running.get(f"/entitlement/shop-7?product={PRODUCT}")

    assert (status, before["reason"]) == (200, "active")
    assert (stored, result["result"]) == (200, "applied")
    assert (status_after, after["reason"]) == (200, "cancelled")
    assert await copied_rows() == 300
