"""Background upkeep on a connection of its own: retention, the change log, gauges.

These queries may scan whole tables, so they run through aiosqlite's thread
and never hold up the event loop or the delivery writer for long: the purge
works in small committed batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import Callable

import aiosqlite

from .metrics import Metrics
from .types import Clock

log = logging.getLogger("sidecar.maintenance")

PURGE_INTERVAL_S = 3600.0
PURGE_BATCH = 1000
# A change to entitlements is logged for the lookups' copy of the table, and
# deleted here once that copy has applied it: a burst of a million changes
# keeps its log rows no longer than this.
PRUNE_INTERVAL_S = 60.0


class Maintenance:
    def __init__(
        self, path: str, busy_timeout_ms: int, retention_days: int, clock: Clock
    ) -> None:
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._retention_s = retention_days * 86400
        self._clock = clock
        self._conn: aiosqlite.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._pruning: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._conn = await aiosqlite.connect(
            self._path, timeout=self._busy_timeout_ms / 1000, isolation_level=None
        )
        await self._conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        await self._conn.execute("PRAGMA synchronous = FULL")
        self._task = asyncio.create_task(self._purge_forever(), name="retention")

    async def purge_expired(self) -> int:
        """Drop bodies older than the retention period; return how many."""
        assert self._conn is not None
        cutoff = int(self._clock()) - self._retention_s
        total = 0
        for table, column in (
            ("deliveries", "received_at"),
            ("quarantine", "last_seen_at"),
        ):
            while True:
                # Each batch commits on its own (autocommit), so the delivery
                # writer never waits long for the write lock.
                cursor = await self._conn.execute(
                    f"UPDATE {table} SET body = NULL WHERE rowid IN (SELECT rowid"
                    f" FROM {table} WHERE {column} < ? AND body IS NOT NULL LIMIT ?)",
                    (cutoff, PURGE_BATCH),
                )
                total += cursor.rowcount
                if cursor.rowcount < PURGE_BATCH:
                    break
        return total

    def prune_changes(self, applied: Callable[[], int | None]) -> None:
        """Delete, from now on, the logged changes up to `applied()` (if not None)."""
        self._pruning = asyncio.create_task(
            self._prune_forever(applied), name="change log"
        )

    async def prune_changes_up_to(self, position: int) -> int:
        """Delete the logged changes up to `position`; return how many."""
        assert self._conn is not None
        total = 0
        while True:
            cursor = await self._conn.execute(
                "DELETE FROM entitlement_changes WHERE seq IN (SELECT seq"
                " FROM entitlement_changes WHERE seq <= ? ORDER BY seq LIMIT ?)",
                (position, PURGE_BATCH),
            )
            total += cursor.rowcount
            if cursor.rowcount < PURGE_BATCH:
                return total

    async def _prune_forever(self, applied: Callable[[], int | None]) -> None:
        while True:
            await asyncio.sleep(PRUNE_INTERVAL_S)
            position = applied()
            if position is None:
                continue
            try:
                await self.prune_changes_up_to(position)
            except sqlite3.Error as exc:
                log.warning("cannot prune the change log, will retry: %s", exc)

    async def _purge_forever(self) -> None:
        while True:
            try:
                dropped = await self.purge_expired()
            except sqlite3.Error as exc:
                log.warning("retention purge failed, will retry: %s", exc)
            else:
                if dropped:
                    log.info("dropped %d stored bodies past retention", dropped)
            await asyncio.sleep(PURGE_INTERVAL_S)

    async def refresh_gauges(self, metrics: Metrics) -> None:
        size = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                size += os.path.getsize(self._path + suffix)
        metrics.database_bytes.set(size)
        if self._conn is None:
            return
        try:
            async with self._conn.execute("SELECT count(*) FROM quarantine") as cursor:
                row = await cursor.fetchone()
        except sqlite3.Error as exc:
            log.warning("cannot count the quarantine: %s", exc)
            return
        metrics.quarantined.set(row[0] if row else 0)

    async def close(self) -> None:
        """Stop the purge and close the connection; safe to call twice."""
        for task in (self._task, self._pruning):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._pruning = None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close()
