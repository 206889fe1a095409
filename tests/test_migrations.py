"""Schema creation and in-place upgrades, on real SQLite files."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from conftest import SCHEMA_V1_SQL, run_cli
from sidecar.migrations import SCHEMA_VERSION, Migration, SchemaError, migrate
from sidecar.storage import connect, open_database

SCHEMA_SQL = Path(__file__).resolve().parents[1] / "schema.sql"


def _schema(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
    ).fetchall()


def _version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _v1_database(path: Path) -> Path:
    """A database as the first release left it, with a row in each table."""
    conn = connect(str(path))
    migrate(conn, {}, schema=SCHEMA_V1_SQL.read_text())
    assert _version(conn) == 1
    conn.execute(
        "INSERT INTO entitlements (shop_id, product, plan, status, version,"
        " delivery_id) VALUES ('shop-1', 'mymodule', 'pro', 'active', 1000, 'd1')"
    )
    conn.execute(
        "INSERT INTO deliveries (delivery_id, received_at, source, event_type, kind,"
        " result, shop_id, product, version, status)"
        " VALUES ('d1', 1, 'webhook', 'subscription.created', 'subscription',"
        " 'applied', 'shop-1', 'mymodule', 1000, 'active')"
    )
    conn.execute(
        "INSERT INTO customers (shop_id, deleted, version, delivery_id)"
        " VALUES ('shop-1', 0, 1, 'd1')"
    )
    conn.close()
    return path


def _add_note(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE entitlements ADD COLUMN note TEXT DEFAULT 'none'")


def _fill_note(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE entitlements SET note = 'step 2 ran'")


def _fail(conn: sqlite3.Connection) -> None:
    raise RuntimeError("this step cannot complete")


def _bad_sql(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE no_such_table ADD COLUMN x TEXT")


def test_new_database_is_at_current_version_with_schema_sql(tmp_path: Path) -> None:
    reference = sqlite3.connect(":memory:")
    reference.executescript(SCHEMA_SQL.read_text())

    conn = open_database(str(tmp_path / "new.db"))

    assert _version(conn) == SCHEMA_VERSION
    assert _schema(conn) == _schema(reference)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _columns(conn: sqlite3.Connection) -> dict[str, list[tuple[Any, ...]]]:
    tables = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
    ).fetchall()
    return {
        name: conn.execute(f"PRAGMA table_info({name})").fetchall()
        for (name,) in tables
    }


def test_open_database_at_version_1_upgrades_to_the_schema_of_a_new_one(
    tmp_path: Path,
) -> None:
    path = _v1_database(tmp_path / "sidecar.db")
    fresh = open_database(str(tmp_path / "fresh.db"))

    conn = open_database(str(path))

    assert _version(conn) == SCHEMA_VERSION
    assert _columns(conn) == _columns(fresh)
    derived = (
        "SELECT type, name, sql FROM sqlite_master"
        " WHERE type IN ('view', 'trigger') ORDER BY type, name"
    )
    assert conn.execute(derived).fetchall() == fresh.execute(derived).fetchall()
    assert conn.execute(
        "SELECT shop_id, entitled, reason FROM entitlements_readable"
    ).fetchall() == [("shop-1", 1, "active")]


def test_upgrade_copies_each_customer_flag_onto_its_entitlement_rows(
    tmp_path: Path,
) -> None:
    path = _v1_database(tmp_path / "sidecar.db")
    with sqlite3.connect(path) as old:
        old.executemany(
            "INSERT INTO entitlements (shop_id, product, plan, status, version,"
            " delivery_id) VALUES (?, ?, 'pro', 'active', 1000, 'd2')",
            [("shop-2", "mymodule"), ("shop-2", "other"), ("shop-3", "mymodule")],
        )
        old.execute(
            "INSERT INTO customers (shop_id, deleted, version, delivery_id)"
            " VALUES ('shop-2', 1, 1, 'd3')"
        )

    conn = open_database(str(path))

    assert conn.execute(
        "SELECT shop_id, product, e.customer_deleted, reason FROM entitlements AS e"
        " JOIN entitlements_readable USING (shop_id, product) ORDER BY 1, 2"
    ).fetchall() == [
        ("shop-1", "mymodule", 0, "active"),
        ("shop-2", "mymodule", 1, "customer_deleted"),
        ("shop-2", "other", 1, "customer_deleted"),
        ("shop-3", "mymodule", 0, "active"),
    ]
    # And the triggers came with the upgrade.
    conn.execute("UPDATE customers SET deleted = 1 WHERE shop_id = 'shop-1'")
    assert conn.execute(
        "SELECT customer_deleted FROM entitlements WHERE shop_id = 'shop-1'"
    ).fetchall() == [(1,)]


def test_open_database_at_current_version_changes_nothing(tmp_path: Path) -> None:
    path = _v1_database(tmp_path / "sidecar.db")
    open_database(str(path)).close()
    with sqlite3.connect(path) as before:
        schema = _schema(before)
        rows = before.execute("SELECT * FROM entitlements").fetchall()

    conn = open_database(str(path))

    assert _version(conn) == SCHEMA_VERSION
    assert _schema(conn) == schema
    assert conn.execute("SELECT * FROM entitlements").fetchall() == rows


UPGRADES = [
    # steps, the version they lead to, the note they leave on the kept row
    pytest.param({1: _add_note}, 2, "none", id="one-step"),
    pytest.param({1: _add_note, 2: _fill_note}, 3, "step 2 ran", id="two-steps"),
]


@pytest.mark.parametrize(("steps", "target", "note"), UPGRADES)
def test_migrate_with_new_steps_upgrades_in_place_keeping_rows(
    tmp_path: Path,
    steps: dict[int, Migration],
    target: int,
    note: str,
) -> None:
    path = _v1_database(tmp_path / "sidecar.db")
    conn = connect(str(path))

    assert migrate(conn, steps) == target

    conn.close()
    with sqlite3.connect(path) as reopened:
        assert _version(reopened) == target
        assert reopened.execute(
            "SELECT shop_id, status, note FROM entitlements"
        ).fetchall() == [("shop-1", "active", note)]
        assert reopened.execute("SELECT count(*) FROM deliveries").fetchone() == (1,)
        assert reopened.execute("SELECT count(*) FROM customers").fetchone() == (1,)


def test_migrate_from_middle_version_runs_only_later_steps(tmp_path: Path) -> None:
    path = _v1_database(tmp_path / "sidecar.db")
    conn = connect(str(path))
    _add_note(conn)
    conn.execute("PRAGMA user_version = 2")

    assert migrate(conn, {1: _fail, 2: _fill_note}) == 3

    assert conn.execute("SELECT note FROM entitlements").fetchall() == [("step 2 ran",)]


@pytest.mark.parametrize(
    ("steps", "error"),
    [
        ({1: _add_note, 2: _fail}, RuntimeError),
        ({1: _add_note, 2: _bad_sql}, sqlite3.OperationalError),
        ({1: _fail}, RuntimeError),
    ],
    ids=["second-step-raises", "second-step-bad-sql", "only-step-raises"],
)
def test_migrate_with_failing_step_leaves_database_at_old_version(
    tmp_path: Path, steps: dict[int, Migration], error: type[Exception]
) -> None:
    path = _v1_database(tmp_path / "sidecar.db")
    with sqlite3.connect(path) as before:
        schema = _schema(before)
    conn = connect(str(path))

    with pytest.raises(error):
        migrate(conn, steps)

    assert not conn.in_transaction
    conn.close()
    with sqlite3.connect(path) as after:
        assert _version(after) == 1
        assert _schema(after) == schema
        assert after.execute("SELECT count(*) FROM entitlements").fetchone() == (1,)


def test_migrate_waiting_for_another_upgrade_does_not_repeat_it(
    tmp_path: Path,
) -> None:
    path = str(_v1_database(tmp_path / "sidecar.db"))
    in_step, release, second_waits = (threading.Event() for _ in range(3))

    def slow_step(conn: sqlite3.Connection) -> None:
        _add_note(conn)
        in_step.set()
        assert release.wait(10)

    first, second = connect(path), connect(path)
    # Called as each statement starts, so before BEGIN waits for the lock.
    second.set_trace_callback(
        lambda sql: second_waits.set() if sql.startswith("BEGIN") else None
    )
    with ThreadPoolExecutor(2) as pool:
        upgrade = pool.submit(migrate, first, {1: slow_step})
        assert in_step.wait(10)
        late = pool.submit(migrate, second, {1: slow_step})
        assert second_waits.wait(10)
        release.set()

        assert (upgrade.result(10), late.result(10)) == (2, 2)


def _newer_database(path: Path) -> Path:
    _v1_database(path)
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    return path


def test_open_database_newer_than_program_is_refused(tmp_path: Path) -> None:
    path = _newer_database(tmp_path / "sidecar.db")

    with pytest.raises(SchemaError) as refused:
        open_database(str(path))

    message = str(refused.value)
    assert f"version {SCHEMA_VERSION + 1}" in message
    assert f"up to {SCHEMA_VERSION}" in message
    assert "upgrade the program" in message
    with sqlite3.connect(path) as conn:
        assert _version(conn) == SCHEMA_VERSION + 1


@pytest.mark.parametrize(
    ("command", "prefix"),
    [
        (lambda db: ["lookup", "shop-1", "--db", db], "entitlement-sidecar: "),
        (lambda db: ["events", "--db", db], "entitlement-sidecar: "),
        (
            lambda db: [
                "serve",
                "--db",
                db,
                "--webhook-listen",
                "127.0.0.1:0",
                "--lookup-listen",
                "127.0.0.1:0",
            ],
            "",
        ),
    ],
    ids=["lookup", "events", "serve"],
)
def test_cli_on_database_newer_than_program_exits_1_with_clear_message(
    tmp_path: Path, command: Callable[[str], list[str]], prefix: str
) -> None:
    path = _newer_database(tmp_path / "sidecar.db")

    result = run_cli(*command(str(path)), timeout=15)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "schema version" in line]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(prefix)
    assert "upgrade the program" in errors[0]
