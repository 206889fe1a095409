"""Start and stop the sidecar: storage, both listeners, and systemd signals."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import sqlite3
import stat
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from . import log, lookup, systemd, webhook
from .app import Sidecar
from .billing import BillingClient, client_from_settings
from .fetch import Fetcher
from .maintenance import Maintenance
from .settings import Listen, Secrets, Settings
from .storage import (
    StorageUnavailable,
    Writer,
    connect,
    last_applied_at,
    record_settings_in_use,
)
from .types import Clock
from .webhook_server import WebhookServer

if TYPE_CHECKING:
    from .cluster import Cluster

# How long handlers still running after the drain get to react to cancellation.
CANCEL_AFTER_DRAIN_S = 0.5


class Server:
    """Both listeners and the storage behind them, started and stopped together."""

    def __init__(
        self, settings: Settings, secrets: Secrets, clock: Clock = time.time
    ) -> None:
        self.settings = settings
        self.secrets = secrets
        self.clock = clock
        self.sidecar: Sidecar | None = None
        self._lookups: web.ServerRunner | None = None
        self._reader: sqlite3.Connection | None = None
        self._writer: Writer | None = None
        self._maintenance: Maintenance | None = None
        self._billing: BillingClient | None = None
        self._fetcher: Fetcher | None = None
        self._in_flight: webhook.InFlight | None = None
        self._webhooks: WebhookServer | None = None
        self._cluster: Cluster | None = None

    async def start(self) -> None:
        """Open the database, then bind both listeners; raise if either fails."""
        settings = self.settings
        # The writer creates and migrates the database before anything reads it.
        self._writer = Writer(settings.db, settings.busy_timeout_ms)
        await self._writer.start()
        self._reader = connect(settings.db, settings.busy_timeout_ms)
        try:
            await self._writer.submit(
                lambda conn: record_settings_in_use(conn, settings.grace_seconds)
            )
        except StorageUnavailable as exc:
            # Lookups can still be answered; only the sqlite3 view is behind.
            log.server.warning("cannot record the settings in use: %s", exc)
        self._maintenance = Maintenance(
            settings.db, settings.busy_timeout_ms, settings.retention_days, self.clock
        )
        await self._maintenance.start()
        if settings.fetch_on_miss:
            self._billing = client_from_settings(settings, self.secrets)
        if self._billing is not None:
            self._fetcher = Fetcher(
                self._billing,
                self._writer,
                budget_s=settings.billing_timeout_seconds,
                wall_clock=self.clock,
            )
        self.sidecar = Sidecar(
            settings=settings,
            secrets=self.secrets,
            writer=self._writer,
            reader=self._reader,
            maintenance=self._maintenance,
            clock=self.clock,
            fetcher=self._fetcher,
        )
        # Lookups read SQLite until this copy of the table is loaded.
        answers = self.sidecar.answers
        answers.start_copy()
        self._maintenance.prune_changes(lambda: answers.copy_position)
        if settings.nats_servers:
            self._cluster = _cluster(self.sidecar)
            self.sidecar.cluster = self._cluster
            await self._cluster.start()

        # Without this, a restart would look like days without a delivery.
        last_applied = last_applied_at(self._reader)
        if last_applied is not None:
            self.sidecar.metrics.note_applied(last_applied)

        self._in_flight = webhook.InFlight()
        self._webhooks = WebhookServer(
            webhook.Deliveries(self.sidecar, self._in_flight),
            max_body_bytes=settings.max_body_bytes,
            read_timeout_s=settings.read_timeout_seconds,
        )
        await _listen(self._webhooks.start, settings.webhook_bind)
        await _listen(self._start_lookups, settings.lookup_bind)
        self.sidecar.ready = True

    async def _start_lookups(self, bind: Listen) -> None:
        assert self.sidecar is not None
        server = lookup.create_server(
            self.sidecar,
            access_log=None,
            # Also closes a connection whose request headers trickle in slower
            # than this, so slow clients cannot pile up.
            keepalive_timeout=self.settings.read_timeout_seconds,
        )
        # Lookups take microseconds: any still running when stop() closes this
        # listener get a short wait, then are cancelled.
        runner = web.ServerRunner(server, shutdown_timeout=CANCEL_AFTER_DRAIN_S)
        await runner.setup()
        self._lookups = runner
        site: web.BaseSite
        if bind.is_unix:
            site = web.UnixSite(runner, bind.path)
        else:
            site = web.TCPSite(runner, bind.host, bind.port)
        await site.start()

    def address(self, index: int) -> str:
        """The bound address of listener `index` (0 webhook, 1 lookup)."""
        if index == 0:
            assert self._webhooks is not None
            return self._webhooks.address
        assert self._lookups is not None
        sockname = self._lookups.addresses[0]
        if isinstance(sockname, str):
            return f"unix:{sockname}"
        host, port = sockname[0], sockname[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def stop(self) -> None:
        """Stop accepting, finish in-flight requests, commit, close; idempotent."""
        if self.sidecar is not None:
            self.sidecar.ready = False
        webhooks, self._webhooks = self._webhooks, None
        lookups, self._lookups = self._lookups, None
        # Stop accepting, then let deliveries already being handled finish,
        # bodies still arriving included, before closing any connection.
        if webhooks is not None:
            webhooks.stop_accepting()
        if lookups is not None:
            for site in list(lookups.sites):
                await site.stop()
        if webhooks is not None and self._in_flight is not None:
            drain_s = max(
                0.0, self.settings.shutdown_timeout_seconds - CANCEL_AFTER_DRAIN_S
            )
            if not await self._in_flight.wait_idle(drain_s):
                log.server.warning(
                    "dropping %d delivery(ies) still in progress after %.1f s",
                    self._in_flight.count,
                    drain_s,
                )
        if webhooks is not None:
            await webhooks.close(CANCEL_AFTER_DRAIN_S)
        if lookups is not None:
            await lookups.cleanup()
        # Fetches still running belong to lookups that have been answered or
        # dropped; they must end before the writer they store through.
        if self._fetcher is not None:
            fetcher, self._fetcher = self._fetcher, None
            await fetcher.close()
        if self._billing is not None:
            billing, self._billing = self._billing, None
            await billing.close()
        if self._cluster is not None:
            await self._cluster.close()
        if self.sidecar is not None:
            self.sidecar.answers.close()
        if self._maintenance is not None:
            await self._maintenance.close()
        if self._writer is not None:
            await self._writer.close()
        if self._reader is not None:
            self._reader.close()
            self._reader = None


async def _listen(start: Callable[[Listen], Awaitable[None]], bind: Listen) -> None:
    if bind.is_unix:
        _remove_stale_socket(bind.path)
    await start(bind)
    if bind.is_unix:
        # Who may connect is decided by the directory the socket sits in.
        os.chmod(bind.path, 0o666)


def _cluster(sidecar: Sidecar) -> Cluster:
    # Imported only here: the NATS client is an optional extra.
    try:
        from .cluster import Cluster
    except ImportError:
        raise ImportError(
            "SIDECAR_NATS_URL is set, but the NATS client is not installed:"
            " install the sidecar with its nats extra"
        ) from None
    return Cluster(
        sidecar.settings,
        sidecar.secrets,
        sidecar.writer,
        sidecar.reader,
        sidecar.metrics,
    )


def _remove_stale_socket(path: str) -> None:
    # A socket left by a killed process would make the bind fail; anything
    # that is not a socket is left alone, and the bind reports it.
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)


async def serve(settings: Settings, secrets: Secrets, warnings: list[str]) -> int:
    """Run until SIGTERM or SIGINT; return the process exit code."""
    for warning in warnings:
        log.server.warning("%s", warning)

    # Before anything can see the listeners: a SIGTERM sent as soon as the
    # "listening" line appears must stop the server cleanly, not kill it.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    server = Server(settings, secrets)
    try:
        await server.start()
    except (OSError, sqlite3.Error, ImportError) as exc:
        log.server.error("cannot start: %s", exc)
        await server.stop()
        return 1

    # What start-up built (modules, settings, both listeners) lasts as long as
    # the process. Frozen, it is left out of every later garbage collection,
    # which otherwise walks all of it again each time.
    gc.freeze()
    log.server.info(
        "listening for webhooks on %s and lookups on %s, database %s",
        server.address(0),
        server.address(1),
        settings.db,
    )
    systemd.notify("READY=1")
    watchdog = None
    interval = systemd.watchdog_interval()
    if interval is not None:
        watchdog = asyncio.create_task(systemd.ping_watchdog(interval))

    await stop.wait()

    log.server.info("stopping: finishing requests in flight")
    systemd.notify("STOPPING=1")
    if watchdog is not None:
        watchdog.cancel()
    await server.stop()
    log.server.info("stopped")
    return 0
