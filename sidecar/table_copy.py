"""Every row of the entitlement table, packed in memory, for lookups.

A lookup that no kept answer serves would otherwise read its row from SQLite.
With a million shops the table is some 130 MB against a page cache of a few
MB, so nearly every such lookup reads a page from the file, and lookups slow
down as the table grows. The copy holds each row in about 50 bytes instead
(with Billing's UUID shop ids), and finds it in the same few steps at any
size.

SQLite stays the truth. The copy starts from the whole table, read in one
transaction beside the position of `entitlement_changes` in that transaction;
the triggers on `entitlements` log every change there, whoever makes it (the
server, `replay`, `import`, an operator in `sqlite3`). `catch_up` reads the
changes logged since the copy's position, each with its row as it stands now,
and applies them. A row whose values the copy cannot hold exactly is marked
`NOT_COPIED`, and the lookup reads it from SQLite.

Rows are fixed-size records in one bytearray and their keys are packed in
another, found through an open-addressing table of row numbers. Nothing here
is a Python object per row: a tuple or a dict entry per row would take several
times the memory.
"""

from __future__ import annotations

import enum
import re
import sqlite3
import struct
import threading
from array import array
from typing import TypeGuard, cast

from .entitlement import StoredEntitlement

_ROWS_SQL = (
    "SELECT shop_id, product, plan, status, trial_end, current_term_end,"
    " updated_at, customer_deleted FROM entitlements"
)
# Each change with its row as it stands now, or NULLs when the row is gone.
_CHANGES_SQL = (
    "SELECT c.seq, c.shop_id, c.product, e.plan, e.status, e.trial_end,"
    " e.current_term_end, e.updated_at, e.customer_deleted, e.shop_id IS NOT NULL"
    " FROM entitlement_changes AS c LEFT JOIN entitlements AS e"
    " ON e.shop_id = c.shop_id AND e.product = c.product"
    " WHERE c.seq > ? ORDER BY c.seq"
)
_POSITION_SQL = "SELECT seq FROM sqlite_sequence WHERE name = 'entitlement_changes'"


def _position(conn: sqlite3.Connection) -> int:
    """The sequence number of the latest change logged (0 before the first)."""
    found = conn.execute(_POSITION_SQL).fetchone()
    return 0 if found is None else int(found[0])


# Applying a change costs a few microseconds on the event loop. More changes
# than this at once (a replay, an import) are cheaper to take by loading the
# whole table again, off the loop, than to apply while lookups wait.
CATCH_UP_LIMIT = 5000
_LOAD_BATCH = 10_000

# Plan id, status id, trial_end, current_term_end, updated_at, flags. Strings
# are numbered in `_strings`. Times are seconds, which fit 32 bits until 2106;
# _NULL stands for SQL NULL. A row with a value that does not fit is NOT_COPIED.
_RECORD = struct.Struct("<HHIIIB")
_STRING_ID = struct.Struct("<H")
_MAX_STRINGS = 2**16
_NULL = 2**32 - 1
_PRESENT = 1
_CUSTOMER_DELETED = 2
_NOT_COPIED = 4
_ABSENT = bytes(_RECORD.size)
# Open addressing stays quick while at most this share of slots is in use.
_MAX_LOAD = 0.75


# Billing's shop ids are UUIDs: the 36 characters of one fit in 16 bytes.
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_UUID_KEY = b"\x00"
_TEXT_KEY = b"\x01"


def _shop_key(shop_id: str) -> bytes:
    # Tagged, so that no shop id's key can equal another's.
    if _UUID.fullmatch(shop_id):
        return _UUID_KEY + bytes.fromhex(shop_id.replace("-", ""))
    return _TEXT_KEY + shop_id.encode()


class Missing(enum.Enum):
    NOT_COPIED = "not copied"


NOT_COPIED = Missing.NOT_COPIED


def _slot_count(rows: int) -> int:
    # A power of two at least twice the rows, so the table can grow by half
    # before it has to be rebuilt larger.
    return 1 << max(10, (2 * rows).bit_length())


class TableCopy:
    """The entitlement table in memory, as of change `position` of its log."""

    def __init__(self, expected_rows: int = 0) -> None:
        self._slots = array("i", [-1]) * _slot_count(expected_rows)
        self._mask = len(self._slots) - 1
        # Row r's key is _keys[_key_ends[r] : _key_ends[r + 1]]: the shop id
        # (see _shop_key), then the product's string id.
        self._key_ends = array("I", [0])
        self._keys = bytearray()
        self._records = bytearray()
        self._strings: list[str | None] = []
        self._string_ids: dict[str | None, int] = {}
        self._present = 0
        # False once a product was left out for want of string ids: lookups
        # of a product the copy does not know then read SQLite.
        self._every_product = True
        self.position = 0

    def __len__(self) -> int:
        """How many rows of the table the copy holds."""
        return self._present

    @property
    def outgrown(self) -> bool:
        """Whether so many keys are held that the copy must be rebuilt larger."""
        return len(self._key_ends) - 1 > _MAX_LOAD * len(self._slots)

    def get(self, shop_id: str, product: str) -> StoredEntitlement | Missing | None:
        """The row for `shop_id` and `product`, None without one, or NOT_COPIED."""
        product_id = self._string_ids.get(product)
        if product_id is None:
            return None if self._every_product else NOT_COPIED
        row = self._find(_shop_key(shop_id) + _STRING_ID.pack(product_id))[0]
        if row < 0:
            return None
        plan, status, trial_end, term_end, updated_at, flags = _RECORD.unpack_from(
            self._records, row * _RECORD.size
        )
        if not flags & _PRESENT:
            return None
        if flags & _NOT_COPIED:
            return NOT_COPIED
        strings = self._strings
        return StoredEntitlement(
            shop_id,
            product,
            strings[plan],
            # put() copies a row only when its status is a string.
            cast(str, strings[status]),
            None if trial_end == _NULL else trial_end,
            None if term_end == _NULL else term_end,
            None if updated_at == _NULL else updated_at,
            flags & _CUSTOMER_DELETED != 0,
        )

    def put(
        self,
        shop_id: object,
        product: object,
        plan: object,
        status: object,
        trial_end: object,
        current_term_end: object,
        updated_at: object,
        customer_deleted: object,
    ) -> None:
        """Hold a row as SQLite returned it (the columns of `_ROWS_SQL`)."""
        if type(shop_id) is not str or type(product) is not str:
            # A lookup binds text, which never equals a key of another type.
            return
        product_id = self._string_id(product)
        if product_id is None:
            self._every_product = False
            return
        # The same test read_entitlement makes, whatever the column holds.
        flags = _PRESENT | (_CUSTOMER_DELETED if customer_deleted != 0 else 0)
        plan_id = self._string_id(plan) if _is_text(plan) else None
        status_id = self._string_id(status) if type(status) is str else None
        if (
            plan_id is not None
            and status_id is not None
            and _is_time(trial_end)
            and _is_time(current_term_end)
            and _is_time(updated_at)
        ):
            record = _RECORD.pack(
                plan_id,
                status_id,
                _NULL if trial_end is None else trial_end,
                _NULL if current_term_end is None else current_term_end,
                _NULL if updated_at is None else updated_at,
                flags,
            )
        else:
            # Say, a date an operator wrote as text: SQLite has it, so ask SQLite.
            record = _RECORD.pack(0, 0, 0, 0, 0, flags | _NOT_COPIED)
        self._store(_shop_key(shop_id) + _STRING_ID.pack(product_id), record)

    def remove(self, shop_id: object, product: object) -> None:
        """Forget a row that is no longer in the table."""
        if type(shop_id) is not str or type(product) is not str:
            return
        product_id = self._string_ids.get(product)
        if product_id is not None:
            key = _shop_key(shop_id) + _STRING_ID.pack(product_id)
            if self._find(key)[0] >= 0:
                # The key keeps its place: its row may well come back.
                self._store(key, _ABSENT)

    def catch_up(self, conn: sqlite3.Connection) -> bool:
        """Apply the changes logged since `position`; False to say: load anew.

        The copy must be loaded again when more changes wait than are worth
        applying here, when some were deleted before this copy applied them,
        or when it has outgrown its slots. Raises sqlite3.Error, having
        applied nothing, when the log cannot be read. `conn` must not be in
        a transaction.
        """
        # One read transaction, so that the count of changes and the changes
        # themselves agree.
        conn.execute("BEGIN")
        try:
            latest = _position(conn)
            if latest == self.position:
                return True
            if not 0 < latest - self.position <= CATCH_UP_LIMIT:
                return False
            changes = conn.execute(_CHANGES_SQL, (self.position,)).fetchall()
        finally:
            conn.execute("ROLLBACK")
        # Sequence numbers of committed changes have no gaps, so a change
        # missing here was deleted unseen.
        if len(changes) != latest - self.position:
            return False
        for _seq, shop_id, product, *columns, exists in changes:
            if exists:
                self.put(shop_id, product, *columns)
            else:
                self.remove(shop_id, product)
        self.position = latest
        return not self.outgrown

    def _find(self, key: bytes) -> tuple[int, int]:
        """The row holding `key` (-1 if none) and the slot that points to it."""
        slots, keys, ends, mask = self._slots, self._keys, self._key_ends, self._mask
        # Python hashes bytes with a key drawn at start-up, so no one can pick
        # shop ids that pile up in one run of slots.
        slot = hash(key) & mask
        while True:
            row = slots[slot]
            if row < 0 or keys[ends[row] : ends[row + 1]] == key:
                return row, slot
            slot = (slot + 1) & mask

    def _store(self, key: bytes, record: bytes) -> None:
        row, slot = self._find(key)
        present = record[-1] & _PRESENT
        if row < 0:
            self._keys += key
            self._key_ends.append(len(self._keys))
            self._records += record
            self._slots[slot] = len(self._key_ends) - 2
        else:
            offset = row * _RECORD.size
            end = offset + _RECORD.size
            present -= self._records[end - 1] & _PRESENT
            self._records[offset:end] = record
        self._present += present

    def _string_id(self, value: str | None) -> int | None:
        """The number of `value` in `_strings`, None once they are all taken."""
        found = self._string_ids.get(value)
        if found is None:
            if len(self._strings) >= _MAX_STRINGS:
                return None
            found = self._string_ids[value] = len(self._strings)
            self._strings.append(value)
        return found


def _is_text(value: object) -> TypeGuard[str | None]:
    return value is None or type(value) is str


def _is_time(value: object) -> TypeGuard[int | None]:
    return value is None or (type(value) is int and 0 <= value < _NULL)


def load(conn: sqlite3.Connection, stop: threading.Event) -> TableCopy | None:
    """Copy the whole table in one read transaction; None if `stop` is set first.

    Runs in a thread of its own: at a million rows it takes seconds.
    """
    conn.execute("BEGIN")
    try:
        position = _position(conn)
        count = conn.execute("SELECT count(*) FROM entitlements").fetchone()[0]
        copy = TableCopy(count)
        copy.position = position
        cursor = conn.execute(_ROWS_SQL)
        while rows := cursor.fetchmany(_LOAD_BATCH):
            if stop.is_set():
                return None
            for row in rows:
                copy.put(*row)
    finally:
        conn.execute("ROLLBACK")
    return copy
