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


# Version n+1 is reached by MIGRATIONS[n]. Add a step here, and the same
# change to schema.sql, whenever a table changes. Views hold no data: every
# upgrade re-creates them all from schema.sql, so they need no step.
MIGRATIONS: dict[int, Migration] = {
    1: _add_settings_in_use,
    2: _add_stream_position,
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
            _recreate_views(conn, statements)
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


def _recreate_views(conn: sqlite3.Connection, statements: list[str]) -> None:
    views = conn.execute("SELECT name FROM sqlite_master WHERE type = 'view'")
    for (name,) in views.fetchall():
        conn.execute(f'DROP VIEW "{name}"')
    for statement in statements:
        if _VIEW.match(statement):
            conn.execute(statement)


_VIEW = re.compile(r"\s*(--[^\n]*\n\s*)*CREATE\s+VIEW\b", re.IGNORECASE)


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
