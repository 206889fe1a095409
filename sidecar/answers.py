"""Lookup answers, serialised once and kept for as long as they stay true.

An answer depends on the stored row and, for a trial or a term that runs out,
on the clock. So each answer is kept with the moment its verdict could flip
(`Verdict.valid_until`), and every kept answer is dropped as soon as the
database may have changed:

- after any commit of this process's writer (deliveries, fetches from the
  Billing API), before any request in that commit is answered, so the next
  lookup sees it;
- after a commit by anything else (`replay`, `import`, an operator in
  `sqlite3`), which `PRAGMA data_version` on the cache's own connection reveals.
  That check costs a read transaction, as much as the rest of a cached
  lookup, so it is made at most once per `EXTERNAL_CHECK_S`: other processes'
  writes are seen within that time.

Dropping everything on every commit is coarse, but commits are rare next to
lookups, and a lookup that misses costs little: it finds its row in the
in-memory copy of the table (`table_copy`), which the same two signals bring
up to date before any lookup reads it. Until that copy is loaded, and for the
rare row it cannot hold, a lookup that misses reads its row from SQLite.

An answer is kept from the second lookup of its shop on, not the first. Most
lookups come again and again from the shops that are in use; a pass over
shops that are each asked once (a batch job, a crawler, a burst of lookups
spread over a million shops) would otherwise pay, for every lookup, to keep an
answer nobody asks for again, and push out the answers that are.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import pydantic_core

from .entitlement import StoredEntitlement, answer, evaluate, unknown_shop_answer
from .storage import read_entitlement
from .table_copy import NOT_COPIED, TableCopy, load

log = logging.getLogger("sidecar.answers")

# Enough for the shops in use at any one time, not for the table. A cache that
# holds a good share of the table answers more uniform lookups from memory on a
# small table than on a large one, so that lookups slow down as the table grows;
# and one holding a third of 100,000 shops made uniform lookups over them no
# faster than no cache at all. About 600 bytes each (key, JSON body,
# bookkeeping): some 2.5 MB when full, and as many hashes of keys asked for
# once, about 0.3 MB more.
MAX_ANSWERS = 4096
EXTERNAL_CHECK_S = 0.001
# After a failed load of the table copy, lookups read SQLite this long before
# the next attempt.
COPY_RETRY_S = 30.0


# Not frozen, for the reason given in events.py: one is built for every lookup
# that finds no kept answer. A kept answer is shared by every lookup it serves,
# and nothing changes it.
@dataclass(slots=True)
class Answer:
    """A lookup answer ready to send, and until when it holds."""

    status: int
    body: bytes
    reason: str
    # UTC seconds; math.inf when only a write to the database can change it.
    valid_until: float

    @property
    def known(self) -> bool:
        """Whether the table has a row for this shop and product."""
        return self.status == 200


def serialise(row: StoredEntitlement, now: float, grace_s: int) -> Answer:
    """Evaluate `row` at `now` and encode the answer as the lookup sends it."""
    verdict = evaluate(row, now, grace_s)
    valid_until = math.inf if verdict.valid_until is None else verdict.valid_until
    return Answer(200, encode(answer(row, verdict)), verdict.reason, valid_until)


def unknown_shop(shop_id: str, reason: str = "unknown_shop") -> Answer:
    """The answer for a (shop, product) the table has no row for."""
    payload = unknown_shop_answer(shop_id, reason)
    return Answer(404, encode(payload), str(payload["reason"]), math.inf)


def encode(payload: dict[str, object]) -> bytes:
    """Compact UTF-8 JSON, as every answer is sent.

    pydantic-core writes it in a fifth of the time json.dumps takes, which is
    a quarter of the cost of a lookup that misses the cache. Unlike json.dumps
    it leaves characters beyond ASCII unescaped, as JSON in UTF-8 allows.
    """
    return pydantic_core.to_json(payload)


class Answers:
    """Answers lookups from the table, through a bounded cache of serialised answers.

    Runs on the event loop with a connection of its own, which it closes:
    its read transactions span several lookups, so nothing else may use it.
    Raises sqlite3.Error when the database cannot be read. `commits` counts
    the commits of this process's own writer. Given `copy_from`, which opens
    another connection, `start_copy` loads the table into memory through it.
    """

    def __init__(
        self,
        reader: sqlite3.Connection,
        commits: Callable[[], int],
        grace_s: int,
        max_answers: int = MAX_ANSWERS,
        copy_from: Callable[[], sqlite3.Connection] | None = None,
    ) -> None:
        self._reader = reader
        # One cursor for every read, rather than a new one built and dropped
        # by each lookup that finds no kept answer.
        self._cursor = reader.cursor()
        self._commits = commits
        self._grace_s = grace_s
        self._max_answers = max_answers
        self._kept: OrderedDict[tuple[str, str], Answer] = OrderedDict()
        # Hashes of keys looked up at least once since this was last emptied.
        # A collision only keeps an answer one lookup early.
        self._asked: set[int] = set()
        self._seen_commits = -1
        self._data_version = -1
        self._next_check = -math.inf
        self._closed = False
        # The latest clock reading answered for: if the clock ever goes back,
        # an answer computed "later" may not hold, so all are dropped.
        self._latest_now = -math.inf
        self._copy_from = copy_from
        self._copy: TableCopy | None = None
        self._copying: asyncio.Task[None] | None = None
        self._stop_copying = threading.Event()
        self._next_copy = -math.inf

    def find(self, shop_id: str, product: str, now: float) -> Answer:
        """Answer for `shop_id` and `product` as the table stands at `now`."""
        self._forget_if_changed(now)
        key = (shop_id, product)
        kept = self._kept.get(key)
        if kept is not None:
            if now < kept.valid_until:
                self._kept.move_to_end(key)
                return kept
            del self._kept[key]

        row = self._read(shop_id, product)
        if row is None:
            found = unknown_shop(shop_id)
        else:
            found = serialise(row, now, self._grace_s)
        self._keep(key, found)
        return found

    def __len__(self) -> int:
        return len(self._kept)

    def __contains__(self, key: tuple[str, str]) -> bool:
        """Whether an answer for (shop_id, product) is kept."""
        return key in self._kept

    @property
    def copied_rows(self) -> int:
        """Rows of the table held in memory: 0 until the copy is loaded."""
        return 0 if self._copy is None else len(self._copy)

    @property
    def copy_position(self) -> int | None:
        """The last change to the table the copy has applied, if it is loaded."""
        return None if self._copy is None else self._copy.position

    def start_copy(self) -> None:
        """Load the table into memory off the event loop, unless that is under way.

        Lookups read SQLite until the copy is loaded, then the copy.
        """
        if self._copy_from is None or self._copying is not None or self._closed:
            return
        self._copy = None
        self._copying = asyncio.get_running_loop().create_task(self._load_copy())

    async def _load_copy(self) -> None:
        assert self._copy_from is not None
        started = time.monotonic()
        try:
            copy = await asyncio.to_thread(self._load_in_thread, self._copy_from)
        except sqlite3.Error as exc:
            log.warning(
                "cannot copy the table for lookups, reading it from SQLite"
                " for %.0f s: %s",
                COPY_RETRY_S,
                exc,
            )
            self._next_copy = time.monotonic() + COPY_RETRY_S
            return
        finally:
            self._copying = None
        if copy is None or self._closed:
            return
        log.info(
            "copied %d rows for lookups in %.2f s",
            len(copy),
            time.monotonic() - started,
        )
        self._copy = copy
        # The next lookup brings the copy up to date before it reads it.
        self._data_version = -1
        self._next_check = -math.inf

    def _load_in_thread(
        self, copy_from: Callable[[], sqlite3.Connection]
    ) -> TableCopy | None:
        conn = copy_from()
        try:
            return load(conn, self._stop_copying)
        finally:
            conn.close()

    def _read(self, shop_id: str, product: str) -> StoredEntitlement | None:
        copy = self._copy
        if copy is not None:
            row = copy.get(shop_id, product)
            if row is not NOT_COPIED:
                return row
        # Each statement outside a transaction is one of its own, and taking
        # and dropping its read lock costs more than the read. Lookups answered
        # in the same pass of the event loop share one read transaction.
        if not self._reader.in_transaction:
            self._reader.execute("BEGIN")
            asyncio.get_running_loop().call_soon(self._end_snapshot)
        return read_entitlement(self._cursor, shop_id, product)

    def _end_snapshot(self) -> None:
        if not self._closed and self._reader.in_transaction:
            self._reader.execute("ROLLBACK")

    def close(self) -> None:
        """End any read transaction and close the connection; safe to call twice.

        A load of the copy still running stops at its next batch of rows.
        """
        self._stop_copying.set()
        if self._copying is not None:
            self._copying.cancel()
        self._end_snapshot()
        self._closed = True
        self._copy = None
        self._reader.close()

    def _forget_if_changed(self, now: float) -> None:
        if now < self._latest_now:
            self._kept.clear()
        self._latest_now = now

        commits = self._commits()
        if commits == self._seen_commits and time.monotonic() < self._next_check:
            return
        # A transaction sees the database as it was when it began.
        self._end_snapshot()
        data_version = self._reader.execute("PRAGMA data_version").fetchone()[0]
        if commits != self._seen_commits or data_version != self._data_version:
            self._kept.clear()
            # Both are noted only once the copy has followed: should reading
            # the changes fail, the next lookup tries again.
            self._follow_changes()
            self._seen_commits = commits
            self._data_version = data_version
        self._next_check = time.monotonic() + EXTERNAL_CHECK_S

    def _follow_changes(self) -> None:
        copy = self._copy
        if copy is None:
            if self._copying is None and time.monotonic() >= self._next_copy:
                self.start_copy()
        elif not copy.catch_up(self._reader):
            self._copy = None
            self.start_copy()

    def _keep(self, key: tuple[str, str], found: Answer) -> None:
        if self._max_answers <= 0:
            return
        marker = hash(key)
        if marker not in self._asked:
            # Emptied all at once when full: a key then needs two lookups
            # within the next MAX_ANSWERS first lookups of other keys.
            if len(self._asked) >= self._max_answers:
                self._asked.clear()
            self._asked.add(marker)
            return
        self._kept[key] = found
        if len(self._kept) > self._max_answers:
            self._kept.popitem(last=False)
