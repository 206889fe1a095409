"""The SQLite database: durable writes through one writer, fast reads on the loop.

Writes go through one connection on one thread. Deliveries that arrive while a
commit is in progress wait in a queue and are committed together in the next
transaction (group commit): each request is still answered only after the
commit that holds it, but concurrent deliveries share one fsync. Lookups are
primary-key reads that take microseconds, less than handing them to a thread,
so they run on the event loop with a connection of their own; WAL mode keeps
them from ever waiting for the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .entitlement import StoredEntitlement
from .events import Event, Kind
from .migrations import migrate

T = TypeVar("T")
Job = Callable[[sqlite3.Connection], Any]

# At most this many queued writes share one transaction.
MAX_BATCH = 512
# Queued after the last write by Writer.close.
_STOP = object()

log = logging.getLogger("sidecar.storage")


class StorageUnavailable(Exception):
    """The database cannot take the write or read now: disk full, locked, I/O."""


def connect(path: str, busy_timeout_ms: int = 5000) -> sqlite3.Connection:
    """Open the database in autocommit mode with the durability settings."""
    conn = sqlite3.connect(
        path,
        timeout=busy_timeout_ms / 1000,
        isolation_level=None,
        check_same_thread=False,
    )
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    conn.execute("PRAGMA journal_mode = WAL")
    # FULL syncs the WAL on every commit, so an acknowledged delivery survives
    # power loss, not only a crash of the process.
    conn.execute("PRAGMA synchronous = FULL")
    return conn


def open_database(path: str, busy_timeout_ms: int = 5000) -> sqlite3.Connection:
    """Open the database and bring its schema up to date."""
    conn = connect(path, busy_timeout_ms)
    try:
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


# Not frozen, for the reason given in events.py; nothing changes them.
@dataclass(slots=True)
class Delivery:
    """An authenticated delivery, ready to be recorded."""

    delivery_id: str
    received_at: int
    source: str
    event: Event
    # Ordering key when the body carries neither resource_version nor
    # updated_at: the signed webhook-timestamp, else the time of receipt (ms).
    fallback_version: int
    body: bytes | None


@dataclass(slots=True)
class Outcome:
    result: str  # 'applied', 'stale', 'duplicate' or 'ignored'
    version: int | None = None


def event_version(event: Event, fallback_version: int) -> int | None:
    """The ordering key of an event, in milliseconds."""
    if event.subscription is not None:
        sub = event.subscription
        if sub.resource_version is not None:
            return sub.resource_version
        if sub.updated_at is not None:
            return sub.updated_at * 1000
        return fallback_version
    if event.customer is not None:
        if event.customer.resource_version is not None:
            return event.customer.resource_version
        return fallback_version
    return None


def record_delivery(conn: sqlite3.Connection, delivery: Delivery) -> Outcome:
    """Record one delivery and apply it; call inside a transaction."""
    seen = conn.execute(
        "SELECT 1 FROM deliveries WHERE delivery_id = ?", (delivery.delivery_id,)
    ).fetchone()
    if seen:
        return Outcome("duplicate")

    event = delivery.event
    version = event_version(event, delivery.fallback_version)
    result = "ignored"
    if event.kind is not Kind.IGNORED:
        assert version is not None
        changed = apply_event(conn, event, version, delivery.delivery_id)
        result = "applied" if changed else "stale"

    sub = event.subscription
    conn.execute(
        "INSERT INTO deliveries (delivery_id, received_at, source, event_type, kind,"
        " result, shop_id, product, version, plan, status, trial_end,"
        " current_term_end, updated_at, customer_deleted, body)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            delivery.delivery_id,
            delivery.received_at,
            delivery.source,
            event.event_type,
            event.kind.value,
            result,
            event.shop_id,
            event.product,
            version,
            sub.plan if sub else None,
            sub.status if sub else None,
            sub.trial_end if sub else None,
            sub.current_term_end if sub else None,
            sub.updated_at if sub else None,
            int(event.customer.deleted) if event.customer else None,
            delivery.body,
        ),
    )
    return Outcome(result, version)


def apply_event(
    conn: sqlite3.Connection, event: Event, version: int, delivery_id: str
) -> bool:
    """Write the event's state if it is newer than the stored one."""
    if event.subscription is not None:
        sub = event.subscription
        cursor = conn.execute(
            "INSERT INTO entitlements (shop_id, product, plan, status, trial_end,"
            " current_term_end, updated_at, version, delivery_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (shop_id, product) DO UPDATE SET"
            " plan = excluded.plan, status = excluded.status,"
            " trial_end = excluded.trial_end,"
            " current_term_end = excluded.current_term_end,"
            " updated_at = excluded.updated_at, version = excluded.version,"
            " delivery_id = excluded.delivery_id"
            " WHERE excluded.version > entitlements.version",
            (
                event.shop_id,
                event.product,
                sub.plan,
                sub.status,
                sub.trial_end,
                sub.current_term_end,
                sub.updated_at,
                version,
                delivery_id,
            ),
        )
        return cursor.rowcount > 0

    assert event.customer is not None
    cursor = conn.execute(
        "INSERT INTO customers (shop_id, deleted, version, delivery_id)"
        " VALUES (?, ?, ?, ?)"
        " ON CONFLICT (shop_id) DO UPDATE SET deleted = excluded.deleted,"
        " version = excluded.version, delivery_id = excluded.delivery_id"
        " WHERE excluded.version > customers.version",
        (event.shop_id, int(event.customer.deleted), version, delivery_id),
    )
    return cursor.rowcount > 0


def record_quarantine(
    conn: sqlite3.Connection,
    delivery_id: str,
    received_at: int,
    status: int,
    reason: str,
    body: bytes,
) -> None:
    """Keep a refused body for the operator; a retry of it updates the row."""
    conn.execute(
        "INSERT INTO quarantine (delivery_id, first_seen_at, last_seen_at, attempts,"
        " status, reason, body) VALUES (?, ?, ?, 1, ?, ?, ?)"
        " ON CONFLICT (delivery_id) DO UPDATE SET last_seen_at = excluded.last_seen_at,"
        " attempts = attempts + 1, status = excluded.status, reason = excluded.reason",
        (delivery_id, received_at, received_at, status, reason, body),
    )


# One B-tree read: the customer's state is copied onto the row by triggers.
_LOOKUP_SQL = (
    "SELECT plan, status, trial_end, current_term_end, updated_at, customer_deleted"
    " FROM entitlements WHERE shop_id = ? AND product = ?"
)


def read_entitlement(
    conn: sqlite3.Connection | sqlite3.Cursor, shop_id: str, product: str
) -> StoredEntitlement | None:
    row = conn.execute(_LOOKUP_SQL, (shop_id, product)).fetchone()
    if row is None:
        return None
    # Positional arguments, and a comparison rather than bool(): both cost
    # less, and this runs for every lookup until the table is in memory.
    plan, status, trial_end, current_term_end, updated_at, deleted = row
    wrong = _unreadable_column(plan, status, trial_end, current_term_end, updated_at)
    if wrong is not None:
        # The value itself stays out of the message, which is logged.
        raise sqlite3.DataError(f"an entitlements row's {wrong} has the wrong type")
    return StoredEntitlement(
        shop_id,
        product,
        plan,
        status,
        trial_end,
        current_term_end,
        updated_at,
        deleted != 0,
    )


def _unreadable_column(
    plan: object,
    status: object,
    trial_end: object,
    current_term_end: object,
    updated_at: object,
) -> str | None:
    """The first column the entitlement rule cannot read, if any.

    Only a write by hand can store one: the columns' affinity turns what the
    sidecar writes into text and numbers, but keeps a blob as it is, and text
    that is no number (a date written out) as text.
    """
    if plan is not None and type(plan) is not str:
        return "plan"
    if type(status) is not str:
        return "status"
    for name, value in (
        ("trial_end", trial_end),
        ("current_term_end", current_term_end),
        ("updated_at", updated_at),
    ):
        if value is not None and type(value) is not int and type(value) is not float:
            return name
    return None


def record_settings_in_use(conn: sqlite3.Connection, grace_s: int) -> None:
    """Write what the entitlements_readable view needs to match lookups."""
    conn.execute(
        "INSERT INTO settings_in_use (name, value) VALUES ('grace_seconds', ?)"
        " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        (str(grace_s),),
    )


def last_applied_at(conn: sqlite3.Connection) -> int | None:
    """When a webhook delivery last changed the table, from the delivery log."""
    # Walks the received_at index backwards and stops at the first match.
    row = conn.execute(
        "SELECT received_at FROM deliveries WHERE result = 'applied'"
        " AND source = 'webhook' ORDER BY received_at DESC LIMIT 1"
    ).fetchone()
    return None if row is None else int(row[0])


class Writer:
    """Serialises every write through one connection, committing in batches.

    The connection belongs to one thread that commits back to back: as soon
    as a commit is done it takes everything queued meanwhile into the next,
    without waiting for the event loop to hand it over. The loop only queues
    jobs and, once a commit is done, answers the futures of its batch.
    """

    def __init__(self, path: str, busy_timeout_ms: int) -> None:
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        # Jobs with their futures; a thread-safe queue, since the writer's
        # thread takes from it while the loop puts into it.
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._conn: sqlite3.Connection | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Transactions this writer has tried to commit, whatever their outcome.
        self.commits = 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._conn = await asyncio.to_thread(
            open_database, self._path, self._busy_timeout_ms
        )
        self._thread = threading.Thread(
            target=self._run, name="sqlite-writer", daemon=True
        )
        self._thread.start()

    async def submit(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run `job` inside a committed transaction; raise StorageUnavailable."""
        if self._thread is None:
            raise StorageUnavailable("the database writer is not running")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put((job, future))
        return await future

    def _run(self) -> None:
        """The writer's thread: commit what is queued, until told to stop."""
        loop = self._loop
        assert loop is not None
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = batch[-1] is _STOP
            batch = [item for item in batch if item is not _STOP]
            if not batch:
                continue
            outcome: list[Any] | BaseException
            try:
                outcome = self._commit([job for job, _ in batch])
            except BaseException as exc:
                # Whatever it is, it ends with this batch: raised out of the
                # thread, it would end the writer and leave every later
                # delivery waiting for an answer that never comes.
                outcome = exc
            # Counted once the commit is over and before any request of the
            # batch is answered, so that whatever is answered next knows the
            # database may have changed.
            self.commits += 1
            try:
                loop.call_soon_threadsafe(_settle, batch, outcome)
            except RuntimeError:
                # The loop is closed: nobody is left to answer.
                return

    def _commit(self, jobs: list[Job]) -> list[Any]:
        conn = self._conn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            results = [job(conn) for job in jobs]
            conn.execute("COMMIT")
        except BaseException:
            # A failed COMMIT may already have rolled back; ROLLBACK then fails
            # with "no transaction is active", which is harmless.
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        return results

    async def close(self) -> None:
        """Commit what is queued, then close the connection; safe to call twice."""
        if self._thread is not None:
            thread, self._thread = self._thread, None
            self._queue.put(_STOP)
            await asyncio.to_thread(thread.join)
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.to_thread(conn.close)


def _settle(
    batch: list[tuple[Job, asyncio.Future[Any]]], outcome: list[Any] | BaseException
) -> None:
    """On the loop: answer each future of a batch with the commit's outcome."""
    if isinstance(outcome, BaseException):
        if not isinstance(outcome, sqlite3.Error):
            log.error("unexpected error in the database writer", exc_info=outcome)
        error = StorageUnavailable(_describe_sqlite_error(outcome))
        for _, future in batch:
            if not future.done():
                future.set_exception(error)
        return
    for (_, future), result in zip(batch, outcome, strict=True):
        if not future.done():
            future.set_result(result)


def _describe_sqlite_error(exc: BaseException) -> str:
    # sqlite3 messages name the condition ("database or disk is full",
    # "database is locked") and never the data, so they are safe to log.
    return f"{type(exc).__name__}: {exc}"
