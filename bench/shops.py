"""Bench shops: a deterministic id for each shop number, and a fast bulk fill.

lookup.lua builds the same ids from the same numbers, so wrk can ask for any
shop without a list of them.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

from sidecar.storage import open_database

PRODUCT = "mymodule"
# Lookups of the "hot" workload go to this many shops, spread over all of them.
HOT_SHOPS = 100

_PLANS = (
    "mymodule-free",
    "mymodule-pro-EUR-monthly",
    "mymodule-pro-EUR-yearly",
    "mymodule-enterprise-EUR-yearly",
)
# Roughly what a module's customer base looks like: mostly paying, some trials.
_STATUS_WEIGHTS = {
    "active": 60,
    "in_trial": 15,
    "non_renewing": 10,
    "cancelled": 10,
    "paused": 3,
    "future": 2,
}
_DAY_S = 86400


def shop_id(index: int) -> str:
    """The id of shop number `index`, shaped like the UUIDs Billing uses."""
    # The multiplier is odd, so the first group is a permutation of the index:
    # ids stay unique but are not inserted in key order.
    scrambled = (index * 73244475) % 2**32
    return f"{scrambled:08x}-b3c4-4d5e-8f60-{index:012x}"


def hot_shop_indexes(shops: int) -> list[int]:
    """The working set of the hot workload, as lookup.lua picks it."""
    count = min(HOT_SHOPS, shops)
    return [slot * shops // count for slot in range(count)]


def fill_database(path: Path, shops: int, seed: int = 1) -> float:
    """Create the sidecar's schema at `path` with `shops` shops; return seconds."""
    started = time.perf_counter()
    conn = open_database(str(path))
    try:
        # Nothing here needs to survive a crash, and a synced fill of 1M rows
        # would dominate the run.
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO entitlements (shop_id, product, plan, status, trial_end,"
            " current_term_end, updated_at, version, delivery_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            _entitlement_rows(shops, random.Random(seed), int(time.time())),
        )
        conn.executemany(
            "INSERT INTO customers (shop_id, deleted, version, delivery_id)"
            " VALUES (?, ?, ?, ?)",
            _customer_rows(shops, random.Random(seed + 1), int(time.time())),
        )
        # No sidecar holds a copy of this table yet, so none needs to hear of
        # these changes. A running one deletes those it has applied, and the
        # file then reuses their pages; VACUUM gives them back at once, so that
        # the database's size is that of a table in use.
        conn.execute("DELETE FROM entitlement_changes")
        conn.execute("COMMIT")
        conn.execute("VACUUM")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return time.perf_counter() - started


def _entitlement_rows(
    shops: int, rng: random.Random, now: int
) -> Iterator[tuple[object, ...]]:
    statuses = list(_STATUS_WEIGHTS)
    weights = list(_STATUS_WEIGHTS.values())
    for index in range(shops):
        status = rng.choices(statuses, weights)[0]
        updated_at = now - rng.randrange(365 * _DAY_S)
        # Half of the trials and terms still run, half have ended.
        end = now + rng.randrange(-30 * _DAY_S, 30 * _DAY_S)
        trial_end = end if status == "in_trial" else None
        term_end = end if status != "in_trial" else end + 30 * _DAY_S
        yield (
            shop_id(index),
            PRODUCT,
            rng.choice(_PLANS),
            status,
            trial_end,
            term_end,
            updated_at,
            updated_at * 1000 + rng.randrange(1000),
            f"import-{index}",
        )


def _customer_rows(
    shops: int, rng: random.Random, now: int
) -> Iterator[tuple[object, ...]]:
    # Only some shops have had a customer event; a few of those were deleted.
    for index in range(0, shops, 5):
        deleted = int(rng.random() < 0.05)
        version = (now - rng.randrange(365 * _DAY_S)) * 1000
        yield shop_id(index), deleted, version, f"import-customer-{index}"
