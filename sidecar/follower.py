"""Apply the shared stream of deliveries to this host's database.

Each host reads the stream through a durable JetStream consumer of its own and
records every message with the code that records a direct delivery, in stream
order, so all hosts end with the same rows. The database, not the consumer, is
the record of how far this host has got: the last applied stream sequence is
committed in the same transaction as the deliveries it covers (table
`stream_position`). At every start, and after any failure, the consumer is
created again to begin right after that sequence. So a new or wiped database
rebuilds from the start of the stream even when the server still remembers an
old position for the consumer, and a restored backup resumes where it was
taken. Messages are acknowledged only after the commit; one that comes again
after a crash is at or below the recorded sequence and is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamInfo
from nats.js.errors import NotFoundError

from .metrics import Metrics
from .settings import Settings
from .storage import (
    Delivery,
    StorageUnavailable,
    Writer,
    record_delivery,
    record_quarantine,
)
from .stream_messages import NewerFormat, Refusal, read_message

log = logging.getLogger("sidecar.follower")

# At most this many messages are committed in one transaction.
BATCH = 256
# How long a fetch waits for a new message before checking the consumer's lag.
IDLE_FETCH_S = 2.0
ACK_WAIT_S = 30.0
RETRY_MIN_S, RETRY_MAX_S = 0.2, 5.0
# Results kept for webhook answers that wait for their own sequence.
RESULTS_KEPT = 4096


@dataclass(frozen=True)
class Position:
    """How far a database has applied a stream."""

    created: str
    sequence: int


@dataclass(frozen=True)
class Item:
    sequence: int
    entry: Delivery | Refusal


def read_position(conn: sqlite3.Connection, stream: str) -> Position | None:
    row = conn.execute(
        "SELECT created, sequence FROM stream_position WHERE stream = ?", (stream,)
    ).fetchone()
    return None if row is None else Position(row[0], row[1])


def record_position(conn: sqlite3.Connection, stream: str, position: Position) -> None:
    conn.execute(
        "INSERT INTO stream_position (stream, created, sequence) VALUES (?, ?, ?)"
        " ON CONFLICT (stream) DO UPDATE SET created = excluded.created,"
        " sequence = excluded.sequence",
        (stream, position.created, position.sequence),
    )


def apply_items(
    conn: sqlite3.Connection, stream: str, created: str, items: list[Item]
) -> list[str]:
    """Record messages in stream order and move the position; call in a transaction."""
    known = read_position(conn, stream)
    last = known.sequence if known is not None else 0
    results = []
    for item in items:
        if item.sequence <= last:
            results.append("duplicate")
            continue
        entry = item.entry
        if isinstance(entry, Refusal):
            record_quarantine(
                conn,
                entry.delivery_id,
                entry.received_at,
                entry.status,
                entry.reason,
                entry.body,
            )
            results.append(f"rejected_{entry.status}")
        else:
            results.append(record_delivery(conn, entry).result)
        last = item.sequence
    record_position(conn, stream, Position(created, last))
    return results


class Follower:
    """Keeps this host's database up with the stream, and says how far it is."""

    def __init__(
        self,
        js: JetStreamContext,
        settings: Settings,
        writer: Writer,
        reader: sqlite3.Connection,
        metrics: Metrics,
        stream_info: Callable[[], Awaitable[StreamInfo]],
    ) -> None:
        self._js = js
        self._stream = settings.nats_stream
        self._subject = settings.nats_subject
        self._consumer = settings.nats_consumer
        self._writer = writer
        self._reader = reader
        self._metrics = metrics
        self._stream_info = stream_info
        self._created = ""
        self._results: OrderedDict[int, str] = OrderedDict()
        self._waiters: dict[int, list[asyncio.Future[str | None]]] = {}
        self.applied_sequence = 0
        self.lag = 0
        self.caught_up = False
        # Set from a failure until following works again.
        self.failing = False
        # Set when following cannot go on without the operator.
        self.halted: str | None = None
        # True until the first new message after subscribing has been taken.
        self._may_skip = True

    async def run(self) -> None:
        """Follow the stream until cancelled or halted, starting over after failures."""
        delay = RETRY_MIN_S
        while self.halted is None:
            subscription = None
            try:
                subscription = await self._subscribe()
                if subscription is not None:
                    await self._follow(subscription)
            except _OutOfOrder as exc:
                log.info("%s; following again from the database", exc)
            except (
                nats.errors.Error,
                TimeoutError,
                StorageUnavailable,
                sqlite3.Error,
            ) as exc:
                # The first failure is news; its repeats during an outage are
                # not, and come less and less often.
                if not self.failing:
                    delay = RETRY_MIN_S
                log.log(
                    logging.DEBUG if self.failing else logging.WARNING,
                    "following stream %s failed, starting again from the database: %s",
                    self._stream,
                    _describe(exc),
                )
                self.failing, self.caught_up = True, False
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
            finally:
                if subscription is not None:
                    with contextlib.suppress(nats.errors.Error):
                        await subscription.unsubscribe()

    async def result_of(self, sequence: int, timeout: float) -> str | None:
        """What applying `sequence` here gave, waiting up to `timeout`; else None."""
        if sequence <= self.applied_sequence:
            return self._results.get(sequence)
        if self.halted is not None:
            return None
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(sequence, []).append(future)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return None
        finally:
            waiting = self._waiters.get(sequence, [])
            if future in waiting:
                waiting.remove(future)
                if not waiting:
                    del self._waiters[sequence]

    async def _subscribe(self) -> JetStreamContext.PullSubscription | None:
        info = await self._stream_info()
        self._created = info.created.isoformat() if info.created else ""
        first, last = info.state.first_seq, info.state.last_seq
        position = read_position(self._reader, self._stream)
        sequence = position.sequence if position is not None else 0

        if position is not None and (
            position.created != self._created or sequence > last
        ):
            # Sequences of a stream created anew start again at 1; what this
            # database holds is kept, and the stream is applied over it.
            log.warning(
                "stream %s is not the one this database followed; applying it"
                " from its start",
                self._stream,
            )
            sequence = 0
            await self._writer.submit(
                lambda conn: record_position(
                    conn, self._stream, Position(self._created, 0)
                )
            )
        if sequence < last and first > sequence + 1:
            self._halt(
                f"stream {self._stream} no longer holds deliveries {sequence + 1}"
                f" to {first - 1}, which this host has not applied: restore a"
                " backup of an up-to-date host's database, then restart"
            )
            return None

        self.applied_sequence = sequence
        self.lag = last - sequence
        self._may_skip = True
        await self._start_consumer(sequence + 1)
        if self.lag == 0:
            self._mark_caught_up()
        return await self._js.pull_subscribe_bind(
            durable=self._consumer, stream=self._stream
        )

    async def _start_consumer(self, start: int) -> None:
        # Whatever position the server remembers for this consumer, the one
        # recorded in the database wins.
        with contextlib.suppress(NotFoundError):
            await self._js.delete_consumer(self._stream, self._consumer)
        await self._js.add_consumer(
            self._stream,
            ConsumerConfig(
                name=self._consumer,
                durable_name=self._consumer,
                description="one host's entitlement sidecar",
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=start,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=ACK_WAIT_S,
                max_ack_pending=4 * BATCH,
                filter_subject=self._subject,
            ),
        )
        log.info(
            "following stream %s from sequence %d as consumer %s",
            self._stream,
            start,
            self._consumer,
        )

    async def _follow(self, subscription: JetStreamContext.PullSubscription) -> None:
        while self.halted is None:
            try:
                messages = await subscription.fetch(1, timeout=IDLE_FETCH_S)
            except TimeoutError:
                await self._check_lag(subscription)
                self.failing = False
                continue
            pending = messages[-1].metadata.num_pending
            if pending:
                # What is already waiting comes at once, without a long poll.
                with contextlib.suppress(TimeoutError):
                    messages += await subscription.fetch(
                        min(pending, BATCH - 1), timeout=1.0
                    )
            await self._apply(messages)
            self.failing = False

    async def _check_lag(self, subscription: JetStreamContext.PullSubscription) -> None:
        info = await subscription.consumer_info()
        # Messages delivered but not acknowledged may be ones this host has
        # applied already: a server restarted after a crash can forget acks
        # and deliver them again after the ack wait. Only what lies past the
        # applied sequence is lag.
        delivered = info.delivered.stream_seq if info.delivered else 0
        self.lag = max(0, delivered - self.applied_sequence) + (info.num_pending or 0)
        if self.lag == 0:
            self._mark_caught_up()

    async def _apply(self, messages: list[Msg]) -> None:
        items: list[Item] = []
        newer: NewerFormat | None = None
        gap: tuple[int, int] | None = None
        expected = self.applied_sequence + 1
        for message in messages:
            metadata = message.metadata
            sequence = metadata.sequence.stream
            # The position only moves forward, so a message applied after a
            # later one would be skipped for good. JetStream delivers out of
            # order when it redelivers one that was lost (a server failing
            # over, say): stop at the hole, and start again from the database.
            # Only the first message after subscribing may skip sequences: the
            # stream itself has none below it.
            if sequence > expected and not self._may_skip:
                gap = (expected, sequence)
                break
            if sequence >= expected:
                expected = sequence + 1
                self._may_skip = False
            try:
                entry = read_message(
                    message.headers, message.data, int(metadata.timestamp.timestamp())
                )
            except NewerFormat as exc:
                newer = exc
                break
            items.append(Item(sequence, entry))

        if items:
            created = self._created
            results = await self._writer.submit(
                lambda conn: apply_items(conn, self._stream, created, items)
            )
            for message in messages[: len(items)]:
                await message.ack()
            self._applied(items, results)
            self.lag = messages[len(items) - 1].metadata.num_pending
            if self.lag == 0:
                self._mark_caught_up()
        if gap is not None:
            raise _OutOfOrder(
                f"the stream delivered sequence {gap[1]} while {gap[0]} was next"
            )
        if newer is not None:
            self._halt(
                f"stream {self._stream} holds a message this version cannot read"
                f" ({newer}): upgrade this host"
            )

    def _applied(self, items: list[Item], results: list[str]) -> None:
        for item, result in zip(items, results, strict=True):
            self._results[item.sequence] = result
            if result == "applied":
                self._metrics.note_applied(time.time())
            if isinstance(item.entry, Refusal):
                log.warning(
                    "quarantined stream message %s: %s",
                    item.entry.delivery_id,
                    item.entry.reason,
                )
            else:
                log.debug(
                    "applied stream message %d, delivery %s: %s",
                    item.sequence,
                    item.entry.delivery_id,
                    result,
                )
        while len(self._results) > RESULTS_KEPT:
            self._results.popitem(last=False)
        self.applied_sequence = max(self.applied_sequence, items[-1].sequence)

        for sequence in [s for s in self._waiters if s <= self.applied_sequence]:
            for future in self._waiters.pop(sequence):
                if not future.done():
                    future.set_result(self._results.get(sequence))

    def _mark_caught_up(self) -> None:
        if not self.caught_up:
            log.info(
                "caught up with stream %s at sequence %d",
                self._stream,
                self.applied_sequence,
            )
        self.caught_up = True

    def _halt(self, reason: str) -> None:
        self.halted = reason
        self.caught_up = False
        log.error("%s", reason)


class _OutOfOrder(Exception):
    """A message arrived ahead of one this host has not applied yet."""


def _describe(exc: BaseException) -> str:
    # NATS and sqlite3 errors name the condition, never message contents.
    return str(exc) or type(exc).__name__
