"""Import of JSON-lines files, and reconcile against a fake Billing API."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import EVENTS_DIR, run_cli
from fake_billing import (
    CLIENT_SECRET,
    Failure,
    FakeBilling,
    running_fake_billing,
    subscription,
)
from sidecar.billing import BillingClient
from sidecar.importer import BadLine, import_file, import_lines, reconcile
from sidecar.storage import open_database

DEFAULT_PRODUCT = "default"


def example_lines() -> list[dict[str, Any]]:
    """Every example body, with the event type a draft body gets from its URL."""
    bodies = []
    for path in sorted(EVENTS_DIR.rglob("*.json")):
        body = json.loads(path.read_text())
        if path.name.startswith("draft-"):
            body["event_type"] = path.stem.removeprefix("draft-")
        bodies.append(body)
    return bodies


BARE_LINES: list[dict[str, Any]] = [
    {
        "shop_id": "shop-bare",
        "product": "othermodule",
        "subscription": subscription("in_trial", 1_700_000_000_000, trial_end=1),
    },
    {
        "shop_id": 42,
        "subscription": subscription("active", 1_700_000_001_000),
    },
    {"shop_id": "shop-plain", "subscription": {"status": "future", "updated_at": 9}},
]


def jsonl(bodies: list[Any]) -> list[bytes]:
    return [json.dumps(body).encode() + b"\n" for body in bodies]


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = open_database(str(tmp_path / "sidecar.db"))
    yield conn
    conn.close()


def table(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT shop_id, product, plan, status, version FROM entitlements"
        " ORDER BY shop_id, product"
    ).fetchall()


def test_import_of_every_example_body_applies_each_shops_newest_state(
    conn: sqlite3.Connection, tmp_path: Path
) -> None:
    bodies = example_lines()
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(jsonl(bodies)))

    report = import_file(conn, str(path), DEFAULT_PRODUCT)

    assert report.bad_lines == []
    # Older states of a shop, and a second customer event of the same version.
    assert dict(report.counts) == {"applied": 9, "stale": 3}
    assert table(conn) == [
        (
            "3f9c2b7e-51d4-4c1a-9e0b-7a6d2c8e1f43",
            "mymodule",
            "mymodule-pro",
            "cancelled",
            1_703_801_610_001,
        ),
        (
            "8d0e6a52-93b1-4f0e-b2c4-5b7f1e2a9c60",
            DEFAULT_PRODUCT,
            "mymodule-basic",
            "in_trial",
            1_700_000_000_000,
        ),
        (
            "b2581e4b-0030-4fc8-9bf2-7f01c550a946",
            "rbm-example",
            "default-free",
            "active",
            1_636_467_088_785,
        ),
        (
            "b71e0c9a-2f64-4d3b-8a15-c0d9e4f26a77",
            "mymodule",
            "mymodule-pro-EUR-monthly",
            "active",
            1_702_000_000_321,
        ),
        (
            "d673f3d0-86b1-4193-a714-dc9c487ec767",
            "rbm-example",
            "default-free",
            "active",
            1_636_467_088_785,
        ),
    ]
    assert conn.execute("SELECT count(*) FROM customers").fetchone() == (3,)
    sources = conn.execute("SELECT DISTINCT source FROM deliveries").fetchall()
    assert sources == [("import",)]


def test_import_in_reverse_order_ends_with_the_same_table(
    conn: sqlite3.Connection, tmp_path: Path
) -> None:
    other = open_database(str(tmp_path / "other.db"))
    lines = jsonl(example_lines())

    import_lines(conn, lines, DEFAULT_PRODUCT)
    import_lines(other, reversed(lines), DEFAULT_PRODUCT)

    assert table(other) == table(conn)
    other.close()


def test_reimport_of_the_same_lines_changes_nothing(
    conn: sqlite3.Connection,
) -> None:
    lines = jsonl(example_lines() + BARE_LINES)
    import_lines(conn, lines, DEFAULT_PRODUCT)
    before = table(conn)

    report = import_lines(conn, lines, DEFAULT_PRODUCT)

    assert dict(report.counts) == {"duplicate": len(lines)}
    assert table(conn) == before
    assert conn.execute("SELECT count(*) FROM deliveries").fetchone() == (len(lines),)


def test_reimport_of_reformatted_lines_is_still_a_duplicate(
    conn: sqlite3.Connection,
) -> None:
    import_lines(conn, jsonl(BARE_LINES), DEFAULT_PRODUCT)
    # Other spacing, and the keys in another order: the same content.
    reformatted = [
        json.dumps(dict(reversed(body.items())), indent=1).replace("\n", "").encode()
        for body in BARE_LINES
    ]

    report = import_lines(conn, reformatted, DEFAULT_PRODUCT)

    assert dict(report.counts) == {"duplicate": len(BARE_LINES)}


def test_import_of_bare_subscriptions_uses_product_module_or_default(
    conn: sqlite3.Connection,
) -> None:
    report = import_lines(conn, jsonl(BARE_LINES), DEFAULT_PRODUCT)

    assert dict(report.counts) == {"applied": 3}
    assert table(conn) == [
        ("42", "mymodule", "mymodule-pro", "active", 1_700_000_001_000),
        ("shop-bare", "othermodule", "mymodule-pro", "in_trial", 1_700_000_000_000),
        ("shop-plain", DEFAULT_PRODUCT, None, "future", 9000),
    ]
    event_types = conn.execute("SELECT DISTINCT event_type FROM deliveries")
    assert event_types.fetchall() == [("subscription.imported",)]


def test_import_with_bad_lines_reports_their_numbers_and_applies_the_rest(
    conn: sqlite3.Connection,
) -> None:
    draft = example_lines()[1]
    assert draft["event_type"] == "subscription_created"
    draft_without_type = {
        key: value for key, value in draft.items() if key != "event_type"
    }
    lines = [
        json.dumps(BARE_LINES[0]).encode(),
        b"{not json",
        b"",
        json.dumps({"shop_id": "bad id!", "subscription": {}}).encode(),
        json.dumps(draft_without_type).encode(),
        b"[1, 2, 3]",
        json.dumps({"shop_id": "shop-x", "subscription": {"plan_id": "p"}}).encode(),
        json.dumps(BARE_LINES[2]).encode(),
    ]

    report = import_lines(conn, lines, DEFAULT_PRODUCT)

    assert dict(report.counts) == {"applied": 2, "rejected": 5}
    assert [bad.line_number for bad in report.bad_lines] == [2, 4, 5, 6, 7]
    assert report.bad_lines[0] == BadLine(2, "the line is not valid JSON")
    assert "event type" in report.bad_lines[2].reason
    assert "status" in report.bad_lines[4].reason
    assert [row[0] for row in table(conn)] == ["shop-bare", "shop-plain"]


@pytest.fixture
async def billing() -> AsyncIterator[FakeBilling]:
    async with running_fake_billing() as fake:
        yield fake


@pytest.fixture
async def client(billing: FakeBilling) -> AsyncIterator[BillingClient]:
    async with billing.client() as client:
        yield client


def store(conn: sqlite3.Connection, shop_id: str, status: str, version: int) -> None:
    line = {"shop_id": shop_id, "subscription": subscription(status, version)}
    report = import_lines(conn, jsonl([line]), DEFAULT_PRODUCT)
    assert report.counts["applied"] == 1


async def test_reconcile_applies_newer_api_states_and_keeps_newer_local_ones(
    conn: sqlite3.Connection, billing: FakeBilling, client: BillingClient
) -> None:
    store(conn, "shop-a", "active", 2_000_000)
    store(conn, "shop-b", "cancelled", 5_000_000)
    billing.subscriptions[("shop-a", "mymodule")] = subscription("cancelled", 3_000_000)
    billing.subscriptions[("shop-b", "mymodule")] = subscription("active", 4_000_000)

    results = await reconcile(conn, client)

    by_shop = {result.shop_id: result for result in results}
    assert by_shop["shop-a"].result == "applied"
    assert by_shop["shop-a"].before is not None
    assert by_shop["shop-a"].before.status == "active"
    assert by_shop["shop-a"].after is not None
    assert by_shop["shop-a"].after.status == "cancelled"
    assert by_shop["shop-b"].result == "stale"
    assert table(conn) == [
        ("shop-a", "mymodule", "mymodule-pro", "cancelled", 3_000_000),
        ("shop-b", "mymodule", "mymodule-pro", "cancelled", 5_000_000),
    ]


async def test_reconcile_run_twice_is_a_duplicate_the_second_time(
    conn: sqlite3.Connection, billing: FakeBilling, client: BillingClient
) -> None:
    store(conn, "shop-a", "active", 2_000_000)
    billing.subscriptions[("shop-a", "mymodule")] = subscription("cancelled", 3_000_000)
    await reconcile(conn, client)

    results = await reconcile(conn, client)

    assert [result.result for result in results] == ["duplicate"]
    api_rows = conn.execute("SELECT count(*) FROM deliveries WHERE source = 'api'")
    assert api_rows.fetchone() == (1,)


async def test_reconcile_of_named_shops_fetches_only_those(
    conn: sqlite3.Connection, billing: FakeBilling, client: BillingClient
) -> None:
    store(conn, "shop-a", "active", 2_000_000)
    store(conn, "shop-b", "active", 2_000_000)
    billing.subscriptions[("shop-new", DEFAULT_PRODUCT)] = subscription(
        "in_trial", 1_000_000
    )

    results = await reconcile(conn, client, ["shop-a", "shop-new"], DEFAULT_PRODUCT)

    assert sorted(billing.api_paths) == [
        "/v1/customers/shop-a/subscriptions/mymodule",
        "/v1/customers/shop-new/subscriptions/default",
    ]
    assert [(r.shop_id, r.result) for r in results] == [
        ("shop-a", "unknown"),
        ("shop-new", "applied"),
    ]


async def test_reconcile_reports_failures_and_carries_on(
    conn: sqlite3.Connection, billing: FakeBilling, client: BillingClient
) -> None:
    store(conn, "shop-a", "active", 2_000_000)
    store(conn, "shop-b", "active", 2_000_000)
    billing.subscriptions[("shop-a", "mymodule")] = b"<html>oops</html>"
    billing.subscriptions[("shop-b", "mymodule")] = subscription("paused", 3_000_000)

    results = await reconcile(conn, client)

    assert [(r.shop_id, r.result) for r in results] == [
        ("shop-a", "failed"),
        ("shop-b", "applied"),
    ]
    assert results[0].error is not None
    assert "not JSON" in results[0].error


async def test_reconcile_with_an_invalid_shop_id_is_refused(
    conn: sqlite3.Connection, billing: FakeBilling, client: BillingClient
) -> None:
    with pytest.raises(ValueError, match="got 'no/such'"):
        await reconcile(conn, client, ["no/such"])
    assert billing.api_requests == 0


# The same through the command line, as an operator runs them.


def test_import_command_applies_a_file_and_is_a_duplicate_the_second_time(
    conn: sqlite3.Connection, tmp_path: Path
) -> None:
    path = tmp_path / "backfill.jsonl"
    path.write_bytes(b"".join(jsonl(BARE_LINES)))
    db = str(tmp_path / "sidecar.db")

    first = run_cli("import", str(path), "--db", db)
    second = run_cli("import", str(path), "--db", db)

    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "imported 3 line(s): 3 applied"
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "imported 3 line(s): 3 duplicate"
    assert [row[0] for row in table(conn)] == ["42", "shop-bare", "shop-plain"]


def test_import_command_with_a_bad_line_names_it_and_exits_1(
    conn: sqlite3.Connection, tmp_path: Path
) -> None:
    path = tmp_path / "backfill.jsonl"
    path.write_bytes(jsonl(BARE_LINES)[0] + b"{not json\n")

    result = run_cli("import", str(path), "--db", str(tmp_path / "sidecar.db"))

    assert result.returncode == 1
    assert result.stderr.strip() == "line 2: the line is not valid JSON"
    assert [row[0] for row in table(conn)] == ["shop-bare"]


def test_import_command_of_a_missing_file_exits_2(
    conn: sqlite3.Connection, tmp_path: Path
) -> None:
    result = run_cli(
        "import", str(tmp_path / "nope.jsonl"), "--db", str(tmp_path / "sidecar.db")
    )

    assert result.returncode == 2
    assert "nope.jsonl" in result.stderr


async def test_reconcile_command_prints_what_changed(
    conn: sqlite3.Connection, billing: FakeBilling, tmp_path: Path
) -> None:
    store(conn, "shop-a", "active", 2_000_000)
    store(conn, "shop-b", "active", 2_000_000)
    billing.subscriptions[("shop-a", "mymodule")] = subscription("cancelled", 3_000_000)
    billing.subscriptions[("shop-b", "mymodule")] = subscription("active", 2_000_000)

    # In a thread, so that the fake API keeps answering on this loop.
    result = await asyncio.to_thread(
        run_cli,
        "reconcile",
        "--db",
        str(tmp_path / "sidecar.db"),
        env=billing.settings_env(),
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "shop-a mymodule: active mymodule-pro -> cancelled mymodule-pro",
        "reconciled 2 shop(s): 1 applied, 1 stale",
    ]
    assert table(conn)[0][3] == "cancelled"


async def test_reconcile_command_with_a_failure_exits_1(
    conn: sqlite3.Connection, billing: FakeBilling, tmp_path: Path
) -> None:
    store(conn, "shop-a", "active", 2_000_000)
    billing.always_fail = Failure(500)

    result = await asyncio.to_thread(
        run_cli,
        "reconcile",
        "shop-a",
        "--db",
        str(tmp_path / "sidecar.db"),
        env=billing.settings_env(),
    )

    assert result.returncode == 1
    assert result.stdout.splitlines()[0].startswith("shop-a mymodule: failed: ")
    assert CLIENT_SECRET not in result.stdout + result.stderr
    assert table(conn)[0][3] == "active"


def test_reconcile_command_without_credentials_exits_2(
    conn: sqlite3.Connection, tmp_path: Path
) -> None:
    result = run_cli("reconcile", "--db", str(tmp_path / "sidecar.db"))

    assert result.returncode == 2
    assert "SIDECAR_BILLING_CLIENT_ID" in result.stderr
