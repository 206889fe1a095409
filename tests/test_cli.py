"""The command line: each subcommand run as a real process on a real database."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    BASIC_TOKEN,
    EVENTS_DIR,
    OTHER_SECRET,
    SECRET,
    Process,
    Running,
    customer_event,
    run_cli,
    spawn_sidecar,
    subscription_event,
)
from sidecar.storage import open_database

START = 1_750_000_000


async def _cli(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the command in a thread, so the in-test server keeps serving."""
    return await asyncio.to_thread(run_cli, *args, env=env)


async def _cli_all(
    runs: list[tuple[list[str], dict[str, str]]],
) -> list[subprocess.CompletedProcess[str]]:
    """Run several commands side by side, each in its own process."""
    return list(await asyncio.gather(*(_cli(*args, env=env) for args, env in runs)))


async def _lookup_text(running: Running, path: str) -> tuple[int, str]:
    async with running.session.get(running.lookup_url + path) as response:
        return response.status, await response.text()


async def _post_at(
    running: Running, moment: int, body: bytes | dict[str, Any], delivery_id: str
) -> int:
    running.clock.now = moment
    status, _ = await running.post(body, delivery_id=delivery_id)
    return status


async def _populate(running: Running) -> None:
    """Store applied, stale, ignored and refused deliveries, ten seconds apart."""
    deliveries: list[tuple[str, bytes | dict[str, Any], int]] = [
        ("d1", subscription_event("shop-a", "active", resource_version=2000), 200),
        ("d2", subscription_event("shop-b", "in_trial", resource_version=1000), 200),
        ("d3", subscription_event("shop-a", "cancelled", resource_version=1000), 200),
        ("d4", {"eventType": "ping", "data": {}}, 200),
        ("d5", customer_event("shop-a", deleted=False, resource_version=5000), 200),
        ("q1", {"eventType": "subscription.updated", "data": {"shopId": "c"}}, 422),
        ("q2", b"not json", 400),
    ]
    for offset, (delivery_id, body, status) in enumerate(deliveries):
        assert await _post_at(running, START + 10 * offset, body, delivery_id) == status


# -- lookup -----------------------------------------------------------------

# Shop, then the HTTP status and the exit code of `lookup` for it.
LOOKUPS = {
    "shop-a": (200, 0),
    "shop-b": (200, 0),
    "shop-c": (200, 0),
    "shop-unknown": (404, 1),
}
# Characters beyond ASCII, which the answer carries unescaped, and a quote.
PLAN_C = 'pro-\u00e9t\u00e9-\u2603-"x"'


async def test_lookup_of_each_shop_prints_same_json_as_http(sidecar: Running) -> None:
    await _populate(sidecar)
    shop_c = subscription_event("shop-c", "active", plan_id=PLAN_C)
    assert await _post_at(sidecar, START + 100, shop_c, "c1") == 200
    # The command reads the real clock; give the server the same.
    sidecar.clock.now = time.time()

    http = {
        shop_id: await _lookup_text(sidecar, f"/entitlement/{shop_id}?product=mymodule")
        for shop_id in LOOKUPS
    }
    printed = await _cli_all(
        [
            (["lookup", shop_id, "--db", str(sidecar.db), "--product", "mymodule"], {})
            for shop_id in LOOKUPS
        ]
    )

    assert {shop_id: status for shop_id, (status, _) in http.items()} == {
        shop_id: status for shop_id, (status, _) in LOOKUPS.items()
    }
    assert {
        shop_id: (result.returncode, result.stdout.strip())
        for shop_id, result in zip(LOOKUPS, printed, strict=True)
    } == {shop_id: (LOOKUPS[shop_id][1], text) for shop_id, (_, text) in http.items()}
    assert json.loads(http["shop-c"][1])["plan"] == PLAN_C


# Arguments and environment, then the exit code and the product looked up.
DEFAULT_PRODUCTS = {
    "built-in-default": ([], {}, (1, None)),
    "env": ([], {"SIDECAR_PRODUCT": "mymodule"}, (0, "mymodule")),
    "flag-beats-env": (
        ["--product", "mymodule"],
        {"SIDECAR_PRODUCT": "othermodule"},
        (0, "mymodule"),
    ),
}


async def test_lookup_without_product_argument_uses_configured_default(
    sidecar: Running,
) -> None:
    await _populate(sidecar)

    printed = await _cli_all(
        [
            (["lookup", "shop-a", "--db", str(sidecar.db), *args], env)
            for args, env, _ in DEFAULT_PRODUCTS.values()
        ]
    )

    assert {
        case: (result.returncode, json.loads(result.stdout).get("product"))
        for case, result in zip(DEFAULT_PRODUCTS, printed, strict=True)
    } == {case: expected for case, (_, _, expected) in DEFAULT_PRODUCTS.items()}


IMPOSSIBLE_SHOP_IDS = ["", "shop/a", "x" * 65, "..", "café"]


async def test_lookup_of_impossible_shop_id_exits_2(tmp_path: Path) -> None:
    db = str(tmp_path / "sidecar.db")

    printed = await _cli_all(
        [(["lookup", shop_id, "--db", db], {}) for shop_id in IMPOSSIBLE_SHOP_IDS]
    )

    for shop_id, result in zip(IMPOSSIBLE_SHOP_IDS, printed, strict=True):
        assert (result.returncode, result.stdout) == (2, ""), shop_id
        assert "shop id" in result.stderr, shop_id
    assert not Path(db).exists()


def test_lookup_without_database_exits_2_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"

    result = run_cli("lookup", "shop-a", "--db", str(missing))

    assert result.returncode == 2
    assert "SIDECAR_DB" in result.stderr and str(missing) in result.stderr
    assert not missing.exists()


# -- events -----------------------------------------------------------------

# Filters, then the deliveries they list, newest first.
EVENT_FILTERS = {
    "all": ([], ["d5", "d4", "d3", "d2", "d1"]),
    "shop": (["--shop", "shop-a"], ["d5", "d3", "d1"]),
    "stale": (["--result", "stale"], ["d3"]),
    "applied": (["--result", "applied"], ["d5", "d2", "d1"]),
    "shop-and-result": (["--shop", "shop-a", "--result", "applied"], ["d5", "d1"]),
    "limit": (["--limit", "2"], ["d5", "d4"]),
    "no-match": (["--shop", "nobody"], []),
    "quarantine": (["--quarantine"], ["q2", "q1"]),
    "quarantine-limit": (["--quarantine", "--limit", "1"], ["q2"]),
}


async def test_events_with_each_filter_lists_matching_deliveries_newest_first(
    sidecar: Running,
) -> None:
    await _populate(sidecar)

    printed = await _cli_all(
        [
            (["events", "--json", "--db", str(sidecar.db), *args], {})
            for args, _ in EVENT_FILTERS.values()
        ]
    )

    assert [result.returncode for result in printed] == [0] * len(EVENT_FILTERS)
    listed = {
        case: [json.loads(line)["delivery_id"] for line in result.stdout.splitlines()]
        for case, result in zip(EVENT_FILTERS, printed, strict=True)
    }
    assert listed == {case: ids for case, (_, ids) in EVENT_FILTERS.items()}


async def test_events_as_json_carry_each_deliverys_facts(sidecar: Running) -> None:
    await _populate(sidecar)

    listed = await _cli("events", "--json", "--db", str(sidecar.db), "--limit", "50")
    refused = await _cli("events", "--json", "--quarantine", "--db", str(sidecar.db))

    first = json.loads(listed.stdout.splitlines()[-1])
    assert first == {
        "received_at": START,
        "delivery_id": "d1",
        "event_type": "subscription.updated",
        "shop_id": "shop-a",
        "product": "mymodule",
        "result": "applied",
        "status": "active",
        "plan": "mymodule-pro",
    }
    quarantined = json.loads(refused.stdout.splitlines()[-1])
    assert {key: quarantined[key] for key in ("delivery_id", "status", "attempts")} == {
        "delivery_id": "q1",
        "status": 422,
        "attempts": 1,
    }
    assert quarantined["last_seen_at"] == START + 50
    assert "subscription" in quarantined["reason"]


async def test_events_as_text_print_one_readable_line_each(sidecar: Running) -> None:
    await _populate(sidecar)

    result = await _cli("events", "--db", str(sidecar.db), "--shop", "shop-a")
    ignored = await _cli("events", "--db", str(sidecar.db), "--result", "ignored")

    first = datetime.fromtimestamp(START, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert result.stdout.splitlines()[-1].split() == [
        first,
        "d1",
        "subscription.updated",
        "shop-a",
        "mymodule",
        "applied",
        "active",
        "mymodule-pro",
    ]
    assert ignored.stdout.split()[1:] == ["d4", "ping", "-", "-", "ignored", "-", "-"]


# -- replay -----------------------------------------------------------------


def _tables(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    with sqlite3.connect(db) as conn:
        return {
            table: conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
            for table in ("entitlements", "customers")
        }


@pytest.mark.parametrize("drop_bodies", [False, True], ids=["bodies", "no-bodies"])
async def test_replay_of_consistent_database_reports_no_difference(
    sidecar: Running, drop_bodies: bool
) -> None:
    await _populate(sidecar)
    if drop_bodies:
        # As after the retention period: only the parsed facts remain.
        sidecar.query("UPDATE deliveries SET body = NULL")
    before = _tables(sidecar.db)

    result = await _cli("replay", "--db", str(sidecar.db))

    assert (result.returncode, result.stdout) == (0, "replay changed 0 row(s)\n")
    assert _tables(sidecar.db) == before


TAMPERING = [
    pytest.param(
        "UPDATE entitlements SET status = 'cancelled', plan = NULL"
        " WHERE shop_id = 'shop-a'",
        ["entitlements shop-a mymodule:"],
        id="changed-row",
    ),
    pytest.param(
        "DELETE FROM entitlements WHERE shop_id = 'shop-b'",
        ["entitlements shop-b mymodule: None ->"],
        id="missing-row",
    ),
    pytest.param(
        "INSERT INTO entitlements (shop_id, product, status, version, delivery_id)"
        " VALUES ('shop-x', 'mymodule', 'active', 1, 'forged')",
        ["entitlements shop-x mymodule: (None, 'active'"],
        id="forged-row",
    ),
    pytest.param(
        # The triggers copy the flag onto the shop's entitlement row too.
        "UPDATE customers SET deleted = 1",
        [
            "entitlements shop-a mymodule: ('mymodule-pro', 'active', None, None,"
            " None, 2000, 1) -> ('mymodule-pro', 'active', None, None, None, 2000, 0)",
            "customers shop-a: (1, 5000) -> (0, 5000)",
        ],
        id="customer-row",
    ),
    pytest.param(
        # Written past the triggers, straight into the copy.
        "UPDATE entitlements SET customer_deleted = 1 WHERE shop_id = 'shop-b'",
        ["entitlements shop-b mymodule: ("],
        id="copied-customer-flag",
    ),
]


@pytest.mark.parametrize(("tamper_sql", "reported"), TAMPERING)
async def test_replay_of_tampered_table_reports_then_repairs_it(
    sidecar: Running, tamper_sql: str, reported: list[str]
) -> None:
    await _populate(sidecar)
    original = _tables(sidecar.db)
    sidecar.query(tamper_sql)
    tampered = _tables(sidecar.db)

    dry_run = await _cli("replay", "--dry-run", "--db", str(sidecar.db))
    after_dry_run = _tables(sidecar.db)
    repair = await _cli("replay", "--db", str(sidecar.db))

    assert dry_run.returncode == 0
    *changes, count = dry_run.stdout.splitlines()
    assert len(changes) == len(reported), dry_run.stdout
    for change, prefix in zip(changes, reported, strict=True):
        assert change.startswith(prefix), dry_run.stdout
    assert count == f"replay would change {len(reported)} row(s)"
    assert after_dry_run == tampered
    assert repair.returncode == 0
    assert repair.stdout.splitlines() == [
        *changes,
        f"replay changed {len(reported)} row(s)",
    ]
    assert _tables(sidecar.db) == original


async def test_replay_repair_is_seen_by_running_lookups(sidecar: Running) -> None:
    await _populate(sidecar)
    sidecar.query("UPDATE entitlements SET status = 'paused' WHERE shop_id = 'shop-a'")
    _, tampered = await sidecar.get("/entitlement/shop-a?product=mymodule")

    await _cli("replay", "--db", str(sidecar.db))
    _, repaired = await sidecar.get("/entitlement/shop-a?product=mymodule")

    assert (tampered["reason"], repaired["reason"]) == ("paused", "active")


# -- send -------------------------------------------------------------------


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    """One running sidecar that accepts both signatures and basic auth."""
    db = tmp_path_factory.mktemp("receiver") / "sidecar.db"
    process = spawn_sidecar(db, env={"SIDECAR_BASIC_AUTH": BASIC_TOKEN})
    yield process
    process.terminate()


def _stored_rows(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        deliveries = conn.execute("SELECT count(*) FROM deliveries").fetchone()[0]
        refused = conn.execute("SELECT count(*) FROM quarantine").fetchone()[0]
        return int(deliveries + refused)


def _address(url: str) -> str:
    return url.removeprefix("http://")


def _get_json(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


SENDS = [
    # body file, extra arguments, the sender's credentials, then the shop,
    # product and plan the running sidecar must then report.
    pytest.param(
        "envelope-subscription-created.json",
        [],
        {"SIDECAR_WEBHOOK_SECRET": SECRET},
        ("3f9c2b7e-51d4-4c1a-9e0b-7a6d2c8e1f43", "mymodule", "mymodule-pro"),
        id="signed-envelope",
    ),
    pytest.param(
        "draft-subscription_created.json",
        ["--event-type", "subscription_created"],
        {"SIDECAR_WEBHOOK_SECRET": SECRET},
        ("8d0e6a52-93b1-4f0e-b2c4-5b7f1e2a9c60", "default", "mymodule-basic"),
        id="signed-draft-with-event-type",
    ),
    pytest.param(
        "envelope-subscription-updated-items.json",
        [],
        {"SIDECAR_BASIC_AUTH": BASIC_TOKEN},
        (
            "b71e0c9a-2f64-4d3b-8a15-c0d9e4f26a77",
            "mymodule",
            "mymodule-pro-EUR-monthly",
        ),
        id="basic-auth-only",
    ),
]


@pytest.mark.parametrize(("file_name", "args", "sender_env", "expected"), SENDS)
def test_send_of_example_body_is_applied_by_running_sidecar(
    receiver: Process,
    file_name: str,
    args: list[str],
    sender_env: dict[str, str],
    expected: tuple[str, str, str],
) -> None:
    process = receiver
    shop_id, product, plan = expected

    result = run_cli(
        "send",
        str(EVENTS_DIR / file_name),
        "--webhook-listen",
        _address(process.webhook_url),
        *args,
        env=sender_env,
    )
    status, answer = _get_json(
        f"{process.lookup_url}/entitlement/{shop_id}?product={product}"
    )

    assert result.returncode == 0, result.stderr
    code, _, reply = result.stdout.partition(" ")
    assert (code, json.loads(reply)["result"]) == ("200", "applied")
    assert (status, answer["plan"]) == (200, plan)


@pytest.mark.parametrize(
    "sender_env",
    [{"SIDECAR_WEBHOOK_SECRET": OTHER_SECRET}, {"SIDECAR_BASIC_AUTH": "billing:no"}],
    ids=["other-secret", "wrong-password"],
)
def test_send_with_wrong_credentials_exits_1_and_stores_nothing(
    receiver: Process, sender_env: dict[str, str]
) -> None:
    before = _stored_rows(receiver.db)

    result = run_cli(
        "send",
        str(EVENTS_DIR / "envelope-payment-failed.json"),
        "--webhook-listen",
        _address(receiver.webhook_url),
        env=sender_env,
    )

    assert result.returncode == 1
    assert result.stdout.startswith("401 ")
    assert _stored_rows(receiver.db) == before


@pytest.mark.parametrize(
    ("target", "exit_code", "message"),
    [
        ("missing.json", 2, "missing.json"),
        ("unreachable", 1, "cannot reach the sidecar"),
    ],
)
def test_send_that_cannot_happen_exits_nonzero_with_reason(
    tmp_path: Path, target: str, exit_code: int, message: str
) -> None:
    body = EVENTS_DIR / "envelope-subscription-created.json"
    file_name = str(tmp_path / "missing.json") if target == "missing.json" else body
    # Nothing listens on this socket path.
    listen = f"unix:{tmp_path}/nobody.sock"

    result = run_cli(
        "send",
        str(file_name),
        "--webhook-listen",
        listen,
        env={"SIDECAR_WEBHOOK_SECRET": SECRET},
    )

    assert result.returncode == exit_code
    assert message in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


# -- backup -----------------------------------------------------------------


async def test_backup_while_serving_gives_a_sound_readable_copy(
    sidecar: Running, tmp_path: Path
) -> None:
    await _populate(sidecar)
    copy = tmp_path / "copy.db"
    stop = asyncio.Event()

    async def keep_writing() -> int:
        written = 0
        while not stop.is_set():
            body = subscription_event(f"busy-{written}", "active")
            status, _ = await sidecar.post(body)
            assert status == 200
            written += 1
        return written

    writer = asyncio.create_task(keep_writing())
    backup = await _cli("backup", str(copy), "--db", str(sidecar.db))
    stop.set()
    written = await writer

    _, live = await _lookup_text(sidecar, "/entitlement/shop-a?product=mymodule")
    from_copy = await _cli(
        "lookup", "shop-a", "--db", str(copy), "--product", "mymodule"
    )
    with sqlite3.connect(copy) as conn:
        integrity = conn.execute("PRAGMA integrity_check").fetchall()
        copied = conn.execute("SELECT count(*) FROM deliveries").fetchone()[0]

    assert backup.returncode == 0, backup.stderr
    assert str(copy) in backup.stdout
    assert (from_copy.returncode, from_copy.stdout.strip()) == (0, live)
    assert integrity == [("ok",)]
    assert 5 <= copied <= 5 + written


def test_backup_to_existing_path_refuses_and_leaves_it(tmp_path: Path) -> None:
    open_database(str(tmp_path / "sidecar.db")).close()
    target = tmp_path / "precious.db"
    target.write_text("keep me")

    result = run_cli("backup", str(target), "--db", str(tmp_path / "sidecar.db"))

    assert result.returncode == 2
    assert str(target) in result.stderr
    assert target.read_text() == "keep me"


def test_cli_without_command_prints_usage_and_exits_2() -> None:
    result = run_cli()

    assert result.returncode == 2
    assert "usage:" in result.stderr
