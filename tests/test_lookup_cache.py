"""Cached lookup answers stay true: writes and the clock are seen as without a cache.

Each test first looks a shop up so that its answer is kept, then changes what
the answer depends on (a delivery, the clock, another connection's write, the
`replay` command) and checks the very next lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    Running,
    StartSidecar,
    customer_event,
    run_cli,
    subscription_event,
)
from sidecar.answers import EXTERNAL_CHECK_S, Answers
from sidecar.entitlement import answer, evaluate
from sidecar.storage import open_database, read_entitlement

SHOP = "shop-cache"
PRODUCT = "mymodule"
END = 1_800_000_000
GRACE = 3600


async def _store(running: Running, body: dict[str, Any]) -> None:
    status, result = await running.post(body)
    assert (status, result["result"]) == (200, "applied"), result


async def _lookup(running: Running, product: str = PRODUCT) -> dict[str, Any]:
    status, found = await running.get(f"/entitlement/{SHOP}?product={product}")
    assert status == 200, found
    return found


async def _lookup_twice(running: Running, product: str = PRODUCT) -> dict[str, Any]:
    # The first lookup reads the table, the second is answered from the cache.
    first = await _lookup(running, product)
    assert await _lookup(running, product) == first
    return first


async def _after_external_check() -> None:
    # Other processes' writes are promised to be seen within this long.
    await asyncio.sleep(2 * EXTERNAL_CHECK_S)


async def test_cached_answer_after_delivery_shows_the_new_state(
    sidecar: Running,
) -> None:
    await _store(sidecar, subscription_event(SHOP, "active", resource_version=1))
    before = await _lookup_twice(sidecar)

    await _store(sidecar, subscription_event(SHOP, "cancelled", resource_version=2))
    after = await _lookup(sidecar)

    assert (before["reason"], after["reason"]) == ("active", "cancelled")


async def test_cached_answers_after_customer_event_change_for_every_product(
    sidecar: Running,
) -> None:
    for product in ("mymodule", "othermodule"):
        body = subscription_event(SHOP, "active", product, resource_version=1)
        await _store(sidecar, body)
        await _lookup_twice(sidecar, product)

    await _store(sidecar, customer_event(SHOP, deleted=True, resource_version=2))
    after = [await _lookup(sidecar, product) for product in ("mymodule", "othermodule")]

    assert [found["reason"] for found in after] == ["customer_deleted"] * 2


async def test_unknown_shop_answer_after_first_delivery_shows_the_shop(
    sidecar: Running,
) -> None:
    for _ in range(2):
        status, _ = await sidecar.get(f"/entitlement/{SHOP}?product={PRODUCT}")
        assert status == 404

    await _store(sidecar, subscription_event(SHOP, "active"))

    assert (await _lookup(sidecar))["reason"] == "active"


@pytest.mark.parametrize(
    ("status", "end_field", "running_reason", "ended_reason"),
    [
        ("in_trial", "trial_end", "trial", "trial_ended"),
        ("non_renewing", "current_term_end", "non_renewing", "term_ended"),
    ],
)
async def test_cached_answer_flips_exactly_at_end_plus_grace(
    sidecar: Running,
    status: str,
    end_field: str,
    running_reason: str,
    ended_reason: str,
) -> None:
    await _store(sidecar, subscription_event(SHOP, status, **{end_field: END}))
    seen = []

    for now in (END - GRACE, END + GRACE - 0.001, END + GRACE, END + GRACE + 1):
        sidecar.clock.now = now
        found = await _lookup_twice(sidecar)
        seen.append((found["entitled"], found["reason"]))

    assert seen == [
        (True, running_reason),
        (True, running_reason),
        (False, ended_reason),
        (False, ended_reason),
    ]


async def test_cached_ended_trial_when_clock_goes_back_is_running_again(
    sidecar: Running,
) -> None:
    await _store(sidecar, subscription_event(SHOP, "in_trial", trial_end=END))
    sidecar.clock.now = END + GRACE
    ended = await _lookup_twice(sidecar)

    sidecar.clock.now = END
    running = await _lookup(sidecar)

    assert (ended["reason"], running["reason"]) == ("trial_ended", "trial")


async def test_cached_answer_after_write_by_other_connection_shows_it(
    sidecar: Running,
) -> None:
    await _store(sidecar, subscription_event(SHOP, "active"))
    before = await _lookup_twice(sidecar)

    with sqlite3.connect(sidecar.db) as conn:
        conn.execute(
            "UPDATE entitlements SET status = 'paused' WHERE shop_id = ?", (SHOP,)
        )
    await _after_external_check()
    after = await _lookup(sidecar)

    assert (before["reason"], after["reason"]) == ("active", "paused")


async def test_cached_answer_after_replay_command_shows_the_rebuilt_row(
    sidecar: Running,
) -> None:
    await _store(sidecar, subscription_event(SHOP, "active"))
    sidecar.query("UPDATE entitlements SET status = 'paused' WHERE shop_id = ?", SHOP)
    await _after_external_check()
    tampered = await _lookup_twice(sidecar)

    replay = await asyncio.to_thread(run_cli, "replay", "--db", str(sidecar.db))
    await _after_external_check()
    repaired = await _lookup(sidecar)

    assert replay.returncode == 0, replay.stderr
    assert (tampered["reason"], repaired["reason"]) == ("paused", "active")


@pytest.mark.parametrize(
    ("status", "fields"),
    [
        ("active", {"current_term_end": END}),
        ("in_trial", {"trial_end": END}),
        ("cancelled", {}),
    ],
)
async def test_cached_answer_is_byte_for_byte_the_uncached_json(
    start_sidecar: StartSidecar, status: str, fields: dict[str, Any]
) -> None:
    running = await start_sidecar()
    await _store(running, subscription_event(SHOP, status, **fields))
    url = f"{running.lookup_url}/entitlement/{SHOP}?product={PRODUCT}"
    bodies = []
    for _ in range(2):
        async with running.session.get(url) as response:
            bodies.append(await response.read())

    with contextlib.closing(open_database(str(running.db))) as conn:
        row = read_entitlement(conn, SHOP, PRODUCT)
    assert row is not None
    verdict = evaluate(row, running.clock(), GRACE)
    uncached = json.dumps(answer(row, verdict), separators=(",", ":")).encode()

    assert bodies == [uncached, uncached]


async def test_answers_beyond_the_bound_are_dropped_and_still_correct(
    tmp_path: Path,
) -> None:
    conn = open_database(str(tmp_path / "sidecar.db"))
    conn.executemany(
        "INSERT INTO entitlements (shop_id, product, status, version, delivery_id)"
        " VALUES (?, ?, ?, 1, 'test')",
        [(f"shop-{number}", PRODUCT, "active") for number in range(4)],
    )
    answers = Answers(conn, lambda: 0, GRACE, max_answers=2)

    found = [answers.find(f"shop-{number % 5}", PRODUCT, END) for number in range(10)]

    assert len(answers) == 2
    assert [answer.status for answer in found] == [200, 200, 200, 200, 404] * 2
    assert all(
        json.loads(answer.body)["shop_id"] == f"shop-{number % 5}"
        for number, answer in enumerate(found)
    )
    conn.close()


async def test_answers_after_own_writer_commit_read_the_table_again(
    tmp_path: Path,
) -> None:
    conn = open_database(str(tmp_path / "sidecar.db"))
    other = open_database(str(tmp_path / "sidecar.db"))
    commits = [0]
    answers = Answers(conn, lambda: commits[0], GRACE)
    assert answers.find(SHOP, PRODUCT, END).reason == "unknown_shop"

    other.execute(
        "INSERT INTO entitlements (shop_id, product, status, version, delivery_id)"
        " VALUES (?, ?, 'active', 1, 'test')",
        (SHOP, PRODUCT),
    )
    commits[0] += 1

    assert answers.find(SHOP, PRODUCT, END).reason == "active"
    other.close()
    conn.close()
