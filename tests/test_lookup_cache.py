"""Cached lookup answers stay true: writes and the clock are seen as without a cache.

Each test first looks a shop up twice so that its answer is kept (an answer is
kept from the second lookup on), then changes what the answer depends on (a
delivery, the clock, another connection's write, the `replay` command) and
checks the very next lookup.
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
    # Both read the table, and the second keeps the answer: the next lookup
    # is answered from the cache unless something has dropped it.
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
    # The third is the kept answer.
    for _ in range(3):
        async with running.session.get(url) as response:
            bodies.append(await response.read())

    with contextlib.closing(open_database(str(running.db))) as conn:
        row = read_entitlement(conn, SHOP, PRODUCT)
    assert row is not None
    verdict = evaluate(row, running.clock(), GRACE)
    uncached = json.dumps(answer(row, verdict), separators=(",", ":")).encode()

    assert bodies == [uncached] * 3


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
    # Each shop twice in a row, so that each answer is kept, over and over.
    numbers = [number // 2 % 5 for number in range(30)]

    found = [answers.find(f"shop-{number}", PRODUCT, END) for number in numbers]

    assert len(answers) == 2
    assert [answer.status for answer in found] == [
        200 if number < 4 else 404 for number in numbers
    ]
    assert all(
        json.loads(answer.body)["shop_id"] == f"shop-{number}"
        for number, answer in zip(numbers, found, strict=True)
    )
    conn.close()


def _table_with_shops(path: Path, shops: list[str]) -> sqlite3.Connection:
    conn = open_database(str(path))
    conn.executemany(
        "INSERT INTO entitlements (shop_id, product, status, version, delivery_id)"
        " VALUES (?, ?, 'active', 1, 'test')",
        [(shop, PRODUCT) for shop in shops],
    )
    return conn


async def test_answer_is_kept_from_the_second_lookup_of_a_shop(
    tmp_path: Path,
) -> None:
    conn = _table_with_shops(tmp_path / "sidecar.db", [SHOP])
    answers = Answers(conn, lambda: 0, GRACE)

    first = answers.find(SHOP, PRODUCT, END)
    kept_after_first = (SHOP, PRODUCT) in answers
    second = answers.find(SHOP, PRODUCT, END)
    kept_after_second = (SHOP, PRODUCT) in answers
    third = answers.find(SHOP, PRODUCT, END)

    assert (kept_after_first, kept_after_second) == (False, True)
    assert third is second
    assert first.body == second.body
    conn.close()


async def test_shops_asked_once_do_not_push_out_answers_asked_again(
    tmp_path: Path,
) -> None:
    once = [f"once-{number}" for number in range(50)]
    conn = _table_with_shops(tmp_path / "sidecar.db", ["hot-a", "hot-b", *once])
    answers = Answers(conn, lambda: 0, GRACE, max_answers=4)
    for shop in ("hot-a", "hot-b") * 2:
        answers.find(shop, PRODUCT, END)

    reasons = {answers.find(shop, PRODUCT, END).reason for shop in once}

    assert reasons == {"active"}
    assert len(answers) == 2
    assert ("hot-a", PRODUCT) in answers and ("hot-b", PRODUCT) in answers
    conn.close()


async def test_shops_asked_for_are_remembered_only_as_many_as_answers_kept(
    tmp_path: Path,
) -> None:
    # What is remembered of shops asked for once is bounded like the answers:
    # after as many other first lookups, a shop's next lookup is a first again.
    shops = ["early", "other-1", "other-2", "other-3"]
    conn = _table_with_shops(tmp_path / "sidecar.db", shops)
    answers = Answers(conn, lambda: 0, GRACE, max_answers=2)
    for shop in shops:
        answers.find(shop, PRODUCT, END)

    answers.find("early", PRODUCT, END)

    assert ("early", PRODUCT) not in answers
    conn.close()


async def test_answers_are_kept_again_at_once_after_a_commit_drops_them(
    tmp_path: Path,
) -> None:
    # Dropping kept answers leaves the shops known as asked for, so a busy
    # shop's answer is kept again at its next lookup, not its second.
    conn = _table_with_shops(tmp_path / "sidecar.db", [SHOP])
    commits = [0]
    answers = Answers(conn, lambda: commits[0], GRACE)
    for _ in range(2):
        answers.find(SHOP, PRODUCT, END)

    commits[0] += 1
    answers.find(SHOP, PRODUCT, END)

    assert (SHOP, PRODUCT) in answers
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


async def test_lookup_connection_left_idle_holds_back_no_checkpoint(
    tmp_path: Path,
) -> None:
    # Lookups answered in one pass of the event loop share a read transaction;
    # once they stop, it must end on its own, or the WAL could never be
    # checkpointed and would grow.
    path = tmp_path / "sidecar.db"
    conn = _table_with_shops(path, [SHOP])
    answers = Answers(conn, lambda: 0, GRACE)
    assert answers.find(SHOP, PRODUCT, END).reason == "active"

    writer = sqlite3.connect(path, timeout=0, isolation_level=None)
    writer.execute(
        "UPDATE entitlements SET status = 'paused' WHERE shop_id = ?", (SHOP,)
    )
    await asyncio.sleep(3 * EXTERNAL_CHECK_S)
    busy, frames, checkpointed = writer.execute(
        "PRAGMA wal_checkpoint(TRUNCATE)"
    ).fetchone()

    assert (busy, frames, checkpointed) == (0, 0, 0)
    writer.close()
    answers.close()
