"""What both listeners share: the running sidecar's state and JSON answers."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pydantic_core
from aiohttp import web

from .answers import Answers
from .auth import Authenticator
from .fetch import Fetcher
from .maintenance import Maintenance
from .metrics import Metrics
from .settings import Secrets, Settings
from .storage import Writer, connect
from .types import Clock

if TYPE_CHECKING:
    # Only typed here: the NATS client is an optional extra.
    from .cluster import Cluster


@dataclass
class Sidecar:
    """Everything a request handler needs, created once at start-up."""

    settings: Settings
    secrets: Secrets
    writer: Writer
    reader: sqlite3.Connection
    maintenance: Maintenance
    clock: Clock = time.time
    metrics: Metrics = field(default_factory=Metrics)
    # Asks the Billing API about shops the table does not know, when enabled.
    fetcher: Fetcher | None = None
    ready: bool = False
    # Set in multi-host mode: deliveries then go through the shared stream.
    cluster: Cluster | None = None

    def __post_init__(self) -> None:
        self.authenticator = Authenticator(self.secrets)

        def open_connection() -> sqlite3.Connection:
            return connect(self.settings.db, self.settings.busy_timeout_ms)

        self.answers = Answers(
            open_connection(),
            lambda: self.writer.commits,
            self.settings.grace_seconds,
            copy_from=open_connection,
        )

    async def refresh_storage_gauges(self) -> None:
        self.metrics.refresh_age(self.clock())
        self.metrics.copied_rows.set(self.answers.copied_rows)
        await self.maintenance.refresh_gauges(self.metrics)


def json_response(
    payload: object, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=pydantic_core.to_json(payload),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(
    status: int, reason: str, headers: dict[str, str] | None = None
) -> web.Response:
    return json_response({"status": status, "error": reason}, status, headers)


def path_parameter(segment: str) -> str:
    """Decode what follows a route's prefix in a path as aiohttp's `path_safe`.

    `path_safe` is decoded except for %2F and %25, so that an encoded slash
    cannot split a segment; a parameter taken from it still needs those two.
    """
    if "%" in segment:
        segment = segment.replace("%2F", "/").replace("%25", "%")
    return segment
