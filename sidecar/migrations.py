"""Create the schema, or upgrade an existing database to it, in one transaction.

`schema.sql` always describes the newest schema and is applied as a whole to a
new database. An existing database records its version in PRAGMA user_version;
each step in MIGRATIONS takes it from one version to the next, and all pending
steps run in one transaction, so an upgrade is applied entirely or not at all.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable

from .resources import read_resource

Migration = Callable[[sqlite3.Connection], None]


def _add_settings_in_use(conn: sqlite3.Connection) -> None:
    # The grace period, written at each start, for the verdict in the view.
    conn.execute(
        "CREATE TABLE settings_in_use (name TEXT PRIMARY KEY, value TEXT NOT NULL)"
        " WITHOUT ROWID"
    )


def _add_stream_position(conn: sqlite3.Connection) -> None:
    # Multi-host mode: the last stream sequence this database has applied.
    conn.execute(
        "CREATE TABLE stream_position ("
        " stream TEXT PRIMARY KEY, created TEXT NOT NULL, sequence INTEGER NOT NULL"
        ") WITHOUT ROWID"
    )


def _copy_customer_deleted(conn: sqlite3.Connection) -> None:
    # Lookups read the flag from the entitlement row; the triggers that keep
    # the copy true come with the others from schema.sql.
    conn.execute(
        "ALTER TABLE entitlements"
        " ADD COLUMN customer_deleted INTEGER NOT NULL DEFAULT 0"
    )
    conn.execute(
        "UPDATE entitlements SET customer_deleted ="
        " (SELECT deleted FROM customers WHERE shop_id = entitlements.shop_id)"
        " WHERE shop_id IN (SELECT shop_id FROM customers WHERE deleted IS NOT 0)"
    )


def _add_entitlement_changes(conn: sqlite3.Connection) -> None:
    # The log the server's in-memory copy of entitlements follows; the
    # triggers that fill it come with the others from schema.sql. A copy
    # always starts from the whole table, so the log can start empty.
    conn.execute(
        "CREATE TABLE entitlement_changes (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
        " shop_id TEXT NOT NULL, product TEXT NOT NULL)"
    )


def _recreate_views_only(conn: sqlite3.Connection) -> None:
    """Change no table; the version exists for its view.

    Version 6 is where entitlements_readable names the rows a lookup cannot
    read, and the views come from schema.sql at every upgrade.
    """


# Version n+1 is reached by MIGRATIONS[n]. Add a step here, and the same
# change to schema.sql, whenever a table changes. Views and triggers hold no
# data: every upgrade re-creates them all from schema.sql, after the steps. A
# change to them alone still takes a new version, with a step that does
# nothing, so that existing databases get it.
MIGRATIONS: dict[int, Migration] = {
    1: _add_settings_in_use,
    2: _add_stream_position,
    3: _copy_customer_deleted,
    4: _add_entitlement_changes,
    5: _recreate_views_only,
}
SCHEMA_VERSION = 1 + len(MIGRATIONS)


class SchemaError(sqlite3.DatabaseError):
    """The database's schema is newer than this program understands."""


def migrate(
    conn: sqlite3.Connection,
    migrations: dict[int, Migration] | None = None,
    schema: str | None = None,
) -> int:
    """Bring the database to the newest version and return that version."""
    steps = MIGRATIONS if migrations is None else migrations
    target = 1 + len(steps)
    current = _checked_version(conn, target)
    if current == target:
        return current

    # The connection runs in autocommit mode; this transaction wraps every step.
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Another process (the server, or a command run beside it) may have
        # upgraded the database while this one waited for the write lock.
        current = _checked_version(conn, target)
        statements = _statements(schema or read_resource("schema.sql"))
        if current == 0:
            for statement in statements:
                conn.execute(statement)
        else:
            for version in range(current, target):
                steps[version](conn)
            _recreate_derived(conn, statements)
        conn.execute(f"PRAGMA user_version = {int(target)}")
        conn.execute("COMMIT")
    except BaseException:
        # Some failures (a full disk) have already rolled the transaction back.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return target


def _checked_version(conn: sqlite3.Connection, target: int) -> int:
    current = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if current > target:
        raise SchemaError(
            f"the database is at schema version {current}, but this program only"
            f" knows up to {target}: upgrade the program, or restore a backup"
        )
    return current


def _recreate_derived(conn: sqlite3.Connection, statements: list[str]) -> None:
    """Drop every view and trigger, and create those schema.sql has."""
    derived = conn.execute(
        "SELECT type, name FROM sqlite_master WHERE type IN ('view', 'trigger')"
    )
    for kind, name in derived.fetchall():
        conn.execute(f'DROP {kind.upper()} IF EXISTS "{name}"')
    for statement in statements:
        if _DERIVED.match(statement):
            conn.execute(statement)


_DERIVED = re.compile(r"\s*(--[^\n]*\n\s*)*CREATE\s+(VIEW|TRIGGER)\b", re.IGNORECASE)


def _statements(script: str) -> list[str]:
    """Split a script on complete statements (executescript would commit)."""
    statements, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            if pending.strip():
                statements.append(pending)
            pending = ""
    return statements
