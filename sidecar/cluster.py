"""Several hosts, one stream of deliveries: multi-host mode on NATS JetStream.

With SIDECAR_NATS_URL set, the webhook listener checks a delivery as in
single-host mode (size, authentication, JSON, event type, shop id; refusals are
answered and quarantined locally), then publishes it to a JetStream stream
instead of writing it, with the delivery id as the message id so that the
stream's duplicate window drops a redelivery. Every host, the receiving one
included, applies the stream to its own database through the follower
(sidecar/follower.py), so every host writes the same rows in the same order.

The webhook answer waits for the publish acknowledgement, which JetStream sends
once a majority of the stream's replicas hold the message, then for up to
SIDECAR_NATS_APPLY_WAIT_SECONDS for this host to apply it, and answers what
that gave (`applied`, `stale`, ...). If this host is slower, the answer is
`202 accepted`: the delivery is safe in the stream and will be applied. When
the publish cannot be acknowledged in time the answer is 503 with Retry-After.
Lookups only ever read the local database and never wait on NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3

import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig, StreamInfo
from nats.js.errors import BadRequestError, NotFoundError
from prometheus_client import Counter, Gauge

from .follower import Follower
from .metrics import Metrics
from .settings import Secrets, Settings
from .storage import Delivery, Outcome, StorageUnavailable, Writer
from .stream_messages import message_headers

log = logging.getLogger("sidecar.cluster")

RECONNECT_WAIT_S = 1
CONNECT_TIMEOUT_S = 2
# Room for the headers next to the body, within the server's max_payload.
HEADER_ROOM_BYTES = 1024


class StreamUnavailable(StorageUnavailable):
    """JetStream cannot take the delivery now; the sender should retry."""


class Cluster:
    """This host's part in the shared stream: its connection, publishing, follower."""

    def __init__(
        self,
        settings: Settings,
        secrets: Secrets,
        writer: Writer,
        reader: sqlite3.Connection,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._secrets = secrets
        self._writer = writer
        self._reader = reader
        self._metrics = metrics
        self._nc = Client()
        self._js: JetStreamContext | None = None
        self._follower: Follower | None = None
        self._task: asyncio.Task[None] | None = None
        self._reported_errors: set[str] = set()
        self._publish_failures = Counter(
            "sidecar_stream_publish_failures",
            "Deliveries answered 503 because the stream did not acknowledge them.",
            registry=metrics.registry,
        )
        self._define_gauges(metrics)

    def _define_gauges(self, metrics: Metrics) -> None:
        # Read at scrape time from the live state, never from NATS.
        Gauge(
            "sidecar_stream_connected",
            "1 while connected to a NATS server, else 0.",
            registry=metrics.registry,
        ).set_function(lambda: float(self._nc.is_connected))
        Gauge(
            "sidecar_stream_lag_messages",
            "Messages in the stream that this host has not applied yet.",
            registry=metrics.registry,
        ).set_function(lambda: float(self._follower.lag if self._follower else 0))
        Gauge(
            "sidecar_stream_applied_sequence",
            "The last stream sequence applied to this host's database.",
            registry=metrics.registry,
        ).set_function(
            lambda: float(self._follower.applied_sequence if self._follower else 0)
        )

    async def start(self) -> None:
        """Connect and follow in the background; lookups never wait for it."""
        self._task = asyncio.create_task(self._run(), name="stream")

    async def _run(self) -> None:
        try:
            await self._connect_and_follow()
        except Exception:
            # Not raised: close() awaits this task and must still succeed.
            log.exception("stopped following the delivery stream")

    async def _connect_and_follow(self) -> None:
        settings = self._settings
        await self._nc.connect(
            servers=settings.nats_servers,
            name=f"entitlement-sidecar {settings.nats_consumer}",
            user=settings.nats_user or None,
            password=self._secrets.nats_password or None,
            token=self._secrets.nats_token or None,
            connect_timeout=CONNECT_TIMEOUT_S,
            reconnect_time_wait=RECONNECT_WAIT_S,
            # Keep trying for as long as the process runs, first connection
            # included: a host whose NATS is down still answers lookups.
            max_reconnect_attempts=-1,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
        )
        log.info("connected to NATS")
        self._reported_errors.clear()
        self._check_payload_limit()
        self._js = self._nc.jetstream(timeout=settings.nats_publish_timeout_seconds)
        self._follower = Follower(
            self._js,
            settings,
            self._writer,
            self._reader,
            self._metrics,
            self._ensure_stream,
        )
        await self._follower.run()

    def _check_payload_limit(self) -> None:
        limit = self._nc.max_payload
        if self._settings.max_body_bytes + HEADER_ROOM_BYTES > limit:
            log.warning(
                "SIDECAR_MAX_BODY_BYTES=%d does not fit the NATS servers' max_payload"
                " of %d bytes: larger bodies will be answered 503; lower the"
                " setting or raise max_payload",
                self._settings.max_body_bytes,
                limit,
            )

    async def _ensure_stream(self) -> StreamInfo:
        """Return the stream's state, creating the stream if it does not exist."""
        assert self._js is not None
        settings = self._settings
        wanted = StreamConfig(
            name=settings.nats_stream,
            description="PrestaShop Billing deliveries for the entitlement sidecars",
            subjects=[settings.nats_subject],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=settings.nats_max_age_days * 86400.0,
            num_replicas=settings.nats_replicas,
            duplicate_window=float(settings.nats_duplicate_window_seconds),
        )
        try:
            info = await self._js.stream_info(settings.nats_stream)
        except NotFoundError:
            try:
                info = await self._js.add_stream(wanted)
            except BadRequestError as refused:
                # Another host may have created it meanwhile; if not, the
                # refusal (too few servers for the replicas, ...) stands.
                try:
                    info = await self._js.stream_info(settings.nats_stream)
                except NotFoundError:
                    raise refused from None
            else:
                log.info("created stream %s", settings.nats_stream)
        self._warn_on_drift(info.config, wanted)
        return info

    def _warn_on_drift(self, actual: StreamConfig, wanted: StreamConfig) -> None:
        # A stream is shared by every host, so one host's settings never
        # rewrite it; the operator changes it with `nats stream edit`.
        checks = [
            ("SIDECAR_NATS_SUBJECT", actual.subjects, wanted.subjects),
            ("SIDECAR_NATS_REPLICAS", actual.num_replicas, wanted.num_replicas),
            ("SIDECAR_NATS_MAX_AGE_DAYS", actual.max_age, wanted.max_age),
            (
                "SIDECAR_NATS_DUPLICATE_WINDOW_SECONDS",
                actual.duplicate_window,
                wanted.duplicate_window,
            ),
        ]
        for setting, have, want in checks:
            if have != want:
                log.warning(
                    "stream %s has %r where %s asks for %r; the stream is left as"
                    " it is",
                    wanted.name,
                    have,
                    setting,
                    want,
                )

    async def publish(self, delivery: Delivery, url_event_type: str | None) -> Outcome:
        """Put a checked delivery in the stream; raise StreamUnavailable."""
        if self._js is None or not self._nc.is_connected:
            self._publish_failures.inc()
            raise StreamUnavailable("not connected to NATS")
        assert delivery.body is not None
        headers = message_headers(delivery, url_event_type, self._settings.product)
        try:
            ack = await self._js.publish(
                self._settings.nats_subject,
                delivery.body,
                timeout=self._settings.nats_publish_timeout_seconds,
                stream=self._settings.nats_stream,
                headers=headers,
            )
        except (nats.errors.Error, TimeoutError) as exc:
            self._publish_failures.inc()
            raise StreamUnavailable(
                f"the stream did not acknowledge: {str(exc) or type(exc).__name__}"
            ) from None

        assert self._follower is not None
        result = await self._follower.result_of(
            ack.seq, self._settings.nats_apply_wait_seconds
        )
        if ack.duplicate:
            # The stream already holds this delivery, from this host or another.
            return Outcome("duplicate")
        return Outcome(result or "accepted")

    def not_ready_reason(self) -> str | None:
        """Why this host's table may be behind the stream, or None when it is not."""
        follower = self._follower
        if follower is not None and follower.halted is not None:
            return follower.halted
        if not self._nc.is_connected:
            return "not connected to NATS"
        if follower is not None and follower.failing:
            return "cannot follow the delivery stream; the log says why"
        if follower is None or not follower.caught_up:
            return "catching up with the delivery stream"
        return None

    async def _on_error(self, exc: Exception) -> None:
        # Reconnect attempts fail the same way every second during an
        # outage; say it once until the next successful connection.
        description = str(exc) or type(exc).__name__
        if description in self._reported_errors:
            log.debug("NATS: %s", description)
            return
        self._reported_errors.add(description)
        log.warning("NATS: %s", description)

    async def _on_disconnected(self) -> None:
        if self._follower is not None:
            self._follower.caught_up = False
        if not self._nc.is_closed:
            log.warning("disconnected from NATS; reconnecting")

    async def _on_reconnected(self) -> None:
        self._reported_errors.clear()
        log.info("reconnected to NATS")

    async def close(self) -> None:
        """Stop following and close the connection; safe to call twice."""
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if not self._nc.is_closed:
            with contextlib.suppress(nats.errors.Error):
                await self._nc.close()
