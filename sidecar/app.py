"""What both listeners share: the running sidecar's state and JSON errors."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
        self.answers = Answers(
            connect(self.settings.db, self.settings.busy_timeout_ms),
            lambda: self.writer.commits,
            self.settings.grace_seconds,
        )

    async def refresh_storage_gauges(self) -> None:
        self.metrics.refresh_age(self.clock())
        await self.maintenance.refresh_gauges(self.metrics)


SIDECAR = web.AppKey("sidecar", Sidecar)


def json_response(
    payload: object, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=json.dumps(payload, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(
    status: int, reason: str, headers: dict[str, str] | None = None
) -> web.Response:
    return json_response({"status": status, "error": reason}, status, headers)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer routing errors (404, 405) with the same JSON shape as ours."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, exc.reason, headers)
